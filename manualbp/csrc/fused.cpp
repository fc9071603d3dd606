// The FusedTrainer's epoch (manualbp/fast/fused.py: step_many, _step, _update) as one C++ loop.
//
// The same ATen kernels with the same arguments in the same order as the Python step, so the result is the
// same bit for bit; only the per-kernel cost of calling from Python is gone. The formulas and their
// derivation are documented once, in fused.py; this file only repeats its kernel sequence. The optimizer
// steps (SGD, Adam, AdamW) are steps.h's, the C++ twin of manualbp/optim_steps.py.
#include "native.h"
#include "steps.h"

#include <utility>

namespace manualbp {
namespace {

// One batch size's preallocated intermediates (fused.py's _Buffers).
struct Buffers {
  Tensors z, act, a, grad, grad_t;  // z^l, [a^l | 1], a^l (views), dL/dz^l / scale, its .t()
  at::Tensor out, out_flat, go_flat;                // o (then log softmax(o)), o flat, dL/do / scale flat
  double scale;                                     // dL/do = scale * grad.back()
};

Buffers unpack(const Tensors& z, const Tensors& act, const Tensors& a,
               const Tensors& grad, const at::Tensor& out, double scale) {
  Buffers buf{z, act, a, grad, {}, out, out.view(-1), grad.back().view(-1), scale};
  for (const auto& g : grad) buf.grad_t.push_back(g.t());
  return buf;
}

// fused.py's output_grad_into for cross-entropy: y - softmax(o) sum_k y_k = -dL/do / |scale| into ``grad``, from
// ``log_probs`` = log softmax(o), with the catalogue's cross-entropy bugs (bugs.py's _output_grad_patch).
void cross_entropy_grad_into(at::Tensor& grad, const at::Tensor& target, const at::Tensor& log_probs) {
  if (active_bug() == kNoBug) {
    at::_log_softmax_backward_data_out(grad, target, log_probs, 1, log_probs.scalar_type());
    return;
  }
  const at::Tensor& normalized = active_bug() == kSoftmaxOverBatch ? at::log_softmax(log_probs, 0) : log_probs;
  at::_log_softmax_backward_data_out(grad, target, normalized, 1, log_probs.scalar_type());  // bug: over the batch
  if (active_bug() == kCrossEntropyGradSign) grad.neg_();                // bug: dL/do = y - softmax(o)
  if (active_bug() == kCrossEntropyMissingSoftmax) grad.copy_(target);   // bug: dL/do = -y
}

// fused.py's block_grad_into under the catalogue's dL/d[W | b] bugs: dest = beta dest + alpha delta, with
// delta = dL/d[W | b] / scale broken as bugs.py's _linear_patches break it (W transposed, b not summed or mean).
void broken_block_grad_(const at::Tensor& dest, const at::Tensor& grad_t, const at::Tensor& below, double beta,
                        double alpha, bool has_bias) {
  const at::Tensor before = beta != 0 ? dest.clone() : at::zeros_like(dest);
  dest.addmm_(grad_t, below, beta, alpha);
  at::Tensor delta = dest - before;  // alpha dL/d[W | b]
  const int64_t in = delta.size(1) - (has_bias ? 1 : 0);
  if (active_bug() == kWeightGradTransposed) {
    at::Tensor w = delta.narrow(1, 0, in);
    w.copy_(w.clone().t().reshape(w.sizes()));  // bug: dL/dW transposed, forced into (out, in)
  }
  if (has_bias && active_bug() == kBiasGradNotSummed) {
    delta.select(1, in).copy_((grad_t * alpha).t().select(0, 0));  // bug: dL/db = dL/dz_1
  }
  if (has_bias && active_bug() == kBiasGradMean) delta.select(1, in).div_(grad_t.size(1));  // bug: 1/N sum_n
  dest.copy_(before + delta);
}

// dest = beta dest + alpha grad_t [a_prev | 1] (fused.py's block_grad_into): dL/dW = (dL/dz)^T a_prev and
// dL/db = sum_n dL/dz in one kernel.
void block_grad_(const at::Tensor& dest, const at::Tensor& grad_t, const at::Tensor& below, double beta, double alpha,
                 bool has_bias) {
  const int64_t bug = active_bug();
  if (bug != kNoBug && (bug == kWeightGradTransposed || bug == kBiasGradNotSummed || bug == kBiasGradMean)) {
    return broken_block_grad_(dest, grad_t, below, beta, alpha, has_bias);
  }
  dest.addmm_(grad_t, below, beta, alpha);  // beta dest + alpha (dL/dz)^T [a_prev | 1]
}

// One step (FusedTrainer._step); returns the loss / loss_scale.
at::Tensor step(const Tensors& blocks, const Tensors& blocks_t,
                const Tensors& weights, const std::vector<int64_t>& codes,
                const std::vector<double>& slopes, bool cross_entropy, SGD& sgd, Adam* adam, Buffers& buf, const at::Tensor& input,
                const at::Tensor& target, const at::Tensor& target_flat) {
  const size_t layers = blocks.size();
  // forward_into
  const at::Tensor* h = &input;
  for (size_t k = 0; k + 1 < layers; ++k) {
    at::mm_out(buf.z[k], *h, blocks_t[k]);
    activation_into(codes[k], slopes[k], buf.z[k], buf.a[k]);
    h = &buf.act[k];
  }
  at::mm_out(buf.out, *h, blocks_t.back());
  // the loss and dL/do, each up to its scale
  at::Tensor dot;
  if (cross_entropy) {
    at::log_softmax_out(buf.out, buf.out, 1);
    dot = at::dot(buf.out_flat, target_flat);
    cross_entropy_grad_into(buf.grad.back(), target, buf.out);  // y - softmax(o) sum_k y_k
  } else {
    at::sub_out(buf.grad.back(), buf.out, target);
    dot = at::dot(buf.go_flat, buf.go_flat);
  }
  // backward, top layer first; plain SGD updates each layer in its gradient's matmul
  const bool plain = adam == nullptr && sgd.plain();
  const double alpha = -sgd.lr * buf.scale;
  for (size_t k = layers; k-- > 0;) {
    const at::Tensor& below = k ? buf.act[k - 1] : input;
    if (k) {  // backprop_into
      if (active_bug() != kNoBug) {  // the catalogue's input-gradient bugs: the W it reads
        at::mm_out(buf.grad[k - 1], buf.grad[k], broken_input_weight(weights[k]));
      } else {
        at::mm_out(buf.grad[k - 1], buf.grad[k], weights[k]);  // dL/da^{l-1} = dL/dz^l W^l
      }
      activation_backward(codes[k - 1], slopes[k - 1], buf.grad[k - 1], buf.a[k - 1], true);  // g sigma'
    }
    const bool has_bias = blocks[k].size(1) != weights[k].size(1);
    if (plain) {  // [W | b] -= lr scale grad^T [a^{l-1} | 1]
      block_grad_(blocks[k], buf.grad_t[k], below, 1, alpha, has_bias);
    } else {      // dL/d[W | b] = scale grad^T [a^{l-1} | 1]
      block_grad_(sgd.grad_blocks[k], buf.grad_t[k], below, 0, buf.scale, has_bias);
    }
  }
  if (adam != nullptr) {
    adam_update(blocks, sgd.grad_blocks, *adam);
  } else if (!plain) {
    sgd_update(blocks, sgd);
  }
  return dot;
}

}  // namespace

// FusedTrainer.step_many's loop: consecutive optimizer steps on the batches of ``batch_size`` rows. ``full`` and
// ``last`` are the buffers of a full and of the (possibly smaller) last batch, as (z, act, a, grad, out,
// scale). ``optimizer`` "adam" or "adamw" steps with Adam (betas, eps, its moments and step count) instead
// of SGD. Returns the batch losses / loss_scale, shape (number of batches,), the momentum buffers and the
// Adam moments m, v.
std::tuple<at::Tensor, Tensors, Tensors, Tensors> fused_step_many(
    const Tensors& blocks, const Tensors& weights, const Activations& activations, const std::string& loss,
    double lr, double momentum, double dampening, double weight_decay, bool nesterov, Tensors momentum_buffers,
    Tensors grad_blocks, const std::string& optimizer, double beta1, double beta2, double eps, Tensors exp_avg,
    Tensors exp_avg_sq, int64_t adam_step, const at::Tensor& input, const at::Tensor& target, int64_t batch_size, const Tensors& full_z,
    const Tensors& full_act, const Tensors& full_a, const Tensors& full_grad, const at::Tensor& full_out,
    double full_scale, const Tensors& last_z, const Tensors& last_act, const Tensors& last_a,
    const Tensors& last_grad, const at::Tensor& last_out, double last_scale) {
  const auto [codes, slopes] = activation_codes(activations);
  const bool cross_entropy = loss == "cross_entropy";  // else squared errors (the notes' 1/2 or mse: the scales)
  TORCH_CHECK(!blocks.empty() && blocks.size() == weights.size(), "step_many: one weight view per block");
  TORCH_CHECK(codes.size() + 1 == blocks.size() && slopes.size() == codes.size(),
              "step_many: one activation per hidden layer");
  TORCH_CHECK(batch_size > 0, "step_many: batch_size must be positive");
  SGD sgd{lr, momentum, dampening, weight_decay, nesterov, std::move(momentum_buffers), std::move(grad_blocks)};
  TORCH_CHECK(optimizer == "sgd" || optimizer == "adam" || optimizer == "adamw", "step_many: unknown optimizer ",
              optimizer);
  Adam adam{lr, beta1, beta2, eps, weight_decay, optimizer == "adamw", std::move(exp_avg), std::move(exp_avg_sq),
            adam_step};
  Adam* adam_or_null = optimizer == "sgd" ? nullptr : &adam;
  TORCH_CHECK((adam_or_null == nullptr && sgd.plain()) || sgd.grad_blocks.size() == blocks.size(),
              "step_many: one gradient block per layer");
  c10::NoGradGuard no_grad;
  Tensors blocks_t;
  for (const auto& b : blocks) blocks_t.push_back(b.t());
  Buffers full = unpack(full_z, full_act, full_a, full_grad, full_out, full_scale);
  Buffers last = unpack(last_z, last_act, last_a, last_grad, last_out, last_scale);
  const int64_t classes = target.size(1);
  auto xs = input.split(batch_size);
  auto ys = target.split(batch_size);
  auto ts = target.view(-1).split(batch_size * classes);
  Tensors dots;
  dots.reserve(xs.size());
  for (size_t b = 0; b < xs.size(); ++b) {
    Buffers& buf = b + 1 < xs.size() ? full : last;
    dots.push_back(step(blocks, blocks_t, weights, codes, slopes, cross_entropy, sgd, adam_or_null, buf, xs[b], ys[b], ts[b]));
  }
  return {at::stack(dots), sgd.momentum_buffers, adam.exp_avg, adam.exp_avg_sq};
}

}  // namespace manualbp
