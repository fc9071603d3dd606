// The drop-in module's autograd nodes: manualbp.autograd's MLPFunction and CrossEntropyFunction (class indices)
// as C++ torch::autograd::Function nodes, so that a step at digits scale pays no Python Function.apply, no
// Python forward/setup_context bodies and no Python backward called by the engine.
//
// The same ATen kernels with the same arguments in the same order as the Python Functions, so the outputs and
// every gradient are the same bit for bit; the backward's ops record a graph when the engine runs it with grad
// mode on (create_graph=True), as the Python backward's do. The formulas and their derivation are documented
// once, in manualbp/functional.py (mlp_forward, mlp_backward, class_cross_entropy,
// cross_entropy_backward_from_log_probs) and the saving rules in manualbp/autograd.py; this file only repeats
// their kernel sequence. manualbp/nn.py decides when these nodes may stand in for the Python ones.
#include "native.h"

#include <torch/csrc/autograd/custom_function.h>

#include <string>
#include <utility>
#include <vector>

namespace manualbp {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };  // functional._REDUCTION_ENUM
constexpr int64_t kIgnoreIndex = -100;                         // functional._IGNORE_INDEX

int64_t reduction_code(const std::string& reduction) {
  if (reduction == "mean") return kMean;
  if (reduction == "sum") return kSum;
  if (reduction == "none") return kNone;
  TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'sum', 'none', got '", reduction, "'");
}

// functional.linear_backward's three products on rows, each with its catalogue bugs (bugs.py's _linear_patches).
Tensor input_grad(const Tensor& g, const Tensor& weight) {
  if (active_bug() != kNoBug) return g.mm(broken_input_weight(weight));  // the bug's W
  return g.mm(weight);                                                    // dL/da_j = sum_i dL/dz_i w_ij
}

Tensor weight_grad(const Tensor& g, const Tensor& a_prev) {
  Tensor grad = g.t().mm(a_prev);                                                       // dL/dw_ij = dL/dz_i a_j
  if (active_bug() == kWeightGradTransposed) return grad.t().reshape(grad.sizes());  // bug: forced into (out, in)
  return grad;
}

Tensor bias_grad(const Tensor& g) {
  switch (active_bug()) {
    case kBiasGradNotSummed: return g.select(0, 0).clone();  // bug: dL/db = dL/dz_1
    case kBiasGradMean: return g.sum(0) / g.size(0);         // bug: dL/db = 1/N sum_n dL/dz_n
    default: return g.sum(0);                                // dL/db_i = dL/dz_i, summed
  }
}

// functional.needs_below
std::vector<bool> needs_below(bool needs_input, const std::vector<bool>& needs_w, const std::vector<bool>& needs_b) {
  std::vector<bool> below{needs_input};
  for (size_t k = 0; k + 1 < needs_w.size(); ++k) below.push_back(below.back() || needs_w[k] || needs_b[k]);
  return below;
}

// ctx->saved_data["meta"]: the non-tensor state of MLPFunction's ctx, one integer list.
enum Meta : size_t { kLayers = 0, kBias, kAllParams, kInputDim, kOutFeatures, kNeeds };  // then needs, codes

// autograd.MLPFunction: apply(input, params, codes, slopes, bias) -> (o, a^1, ..., a^{L-1}).
struct MLPNode : public torch::autograd::Function<MLPNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, at::TensorList params,
                               const std::vector<int64_t>& codes, const std::vector<double>& slopes, bool bias) {
    const size_t layers = codes.size() + 1;
    const size_t step = bias ? 2 : 1;
    TORCH_CHECK(params.size() == layers * step, "mlp: expected ", layers * step, " parameters, got ", params.size());
    auto bias_of = [&](size_t l) -> std::optional<Tensor> {
      return bias ? std::optional<Tensor>(params[2 * l + 1]) : std::nullopt;
    };
    // functional.mlp_forward on rows (N, in)
    const int64_t input_dim = input.dim();
    const Tensor x = input_dim == 2 ? input : input.reshape({-1, input.size(-1)});
    variable_list outputs(layers);
    Tensor a = x;
    for (size_t l = 0; l + 1 < layers; ++l) {
      Tensor z = at::linear(a, params[step * l], bias_of(l));  // z_i = sum_j w_ij a_j + b_i
      activation_into(codes[l], slopes[l], z, z);              // a_i = sigma(z_i), over z
      a = z;
      outputs[l + 1] = a;
    }
    Tensor o = at::linear(a, params[step * (layers - 1)], bias_of(layers - 1));  // o_k = sum_i w_ki a_i + b_k
    const int64_t out_features = o.size(-1);
    if (input_dim != 2) {  // (*, out)
      std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - 1);
      shape.push_back(out_features);
      o = o.reshape(shape);
    }
    outputs[0] = o;

    // MLPFunction.setup_context: save only what the backward will read.
    std::vector<bool> needs{input.requires_grad()};
    bool all_params = true, any = needs[0];
    for (const Tensor& p : params) {
      needs.push_back(p.requires_grad());
      all_params = all_params && needs.back();
      any = any || needs.back();
    }
    if (any) {
      variable_list to_save;
      to_save.reserve(2 * layers);
      if (all_params) {
        to_save.push_back(input);
        to_save.push_back(needs[0] ? params[0] : Tensor());
        for (size_t l = 1; l < layers; ++l) to_save.push_back(params[step * l]);
        for (size_t l = 1; l < layers; ++l) to_save.push_back(outputs[l]);
      } else {
        std::vector<bool> needs_w(layers), needs_b(layers, false);
        for (size_t l = 0; l < layers; ++l) {
          needs_w[l] = needs[1 + step * l];
          if (bias) needs_b[l] = needs[2 + step * l];
        }
        const auto below = needs_below(needs[0], needs_w, needs_b);
        to_save.push_back(needs_w[0] ? input : Tensor());
        for (size_t l = 0; l < layers; ++l) to_save.push_back(below[l] ? params[step * l] : Tensor());
        for (size_t l = 1; l < layers; ++l) to_save.push_back(needs_w[l] || below[l] ? outputs[l] : Tensor());
      }
      ctx->save_for_backward(std::move(to_save));
      std::vector<int64_t> meta{static_cast<int64_t>(layers), bias, all_params, input_dim, out_features};
      for (bool n : needs) meta.push_back(n);
      meta.insert(meta.end(), codes.begin(), codes.end());
      ctx->saved_data["meta"] = std::move(meta);
      ctx->saved_data["slopes"] = slopes;
      ctx->saved_data["shape"] = input.sizes().vec();
    }
    ctx->set_materialize_grads(false);
    return outputs;
  }

  // MLPFunction.backward, then functional.mlp_backward.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto meta = ctx->saved_data["meta"].toIntVector();
    const size_t layers = meta[kLayers];
    const bool bias = meta[kBias];
    const size_t step = bias ? 2 : 1;
    const size_t n_params = layers * step;
    const int64_t* needs = meta.data() + kNeeds;  // input, then params
    const int64_t* codes = needs + 1 + n_params;
    const auto slopes = ctx->saved_data["slopes"].toDoubleVector();
    variable_list result(1 + n_params + 3);  // input, params, codes, slopes, bias

    variable_list saved = ctx->get_saved_variables();
    Tensor input = saved[0];
    Tensor grad_output = grads[0];
    bool any_hidden = false;
    for (size_t k = 1; k < grads.size(); ++k) {
      if (grads[k].defined()) {  // a hidden activation was used downstream too (double backward)
        if (!grad_output.defined()) grad_output = grads[k].new_zeros({grads[k].size(0), meta[kOutFeatures]});
        any_hidden = true;
        break;
      }
    }
    if (!any_hidden && !grad_output.defined()) return result;  // nothing was used: every gradient is zero
    const int64_t input_dim = meta[kInputDim];
    if (input_dim != 2) {  // (*, in) and (*, out) -> rows (N, in) and (N, out)
      grad_output = grad_output.reshape({-1, grad_output.size(-1)});
      if (input.defined()) input = input.reshape({-1, input.size(-1)});
    }
    std::vector<bool> needs_w(layers, true), needs_b(layers, bias);
    std::vector<bool> below;
    if (meta[kAllParams]) {  // every weight needs its gradient: only layer 0 may keep dL/dx to itself
      below.assign(layers, true);
      below[0] = needs[0];
    } else {
      for (size_t l = 0; l < layers; ++l) {
        needs_w[l] = needs[1 + step * l];
        needs_b[l] = bias && needs[2 + step * l];
      }
      below = needs_below(needs[0], needs_w, needs_b);
    }
    Tensor g = grad_output;  // dL/do
    for (size_t layer = layers; layer-- > 0;) {
      const Tensor& a_prev = layer > 0 ? saved[layers + layer] : input;
      const Tensor& weight = saved[1 + layer];
      // functional.linear_backward on rows
      Tensor grad_a = below[layer] ? input_grad(g, weight) : Tensor();              // dL/da_j = sum_i dL/dz_i w_ij
      if (needs_w[layer]) result[1 + step * layer] = weight_grad(g, a_prev);         // dL/dw_ij = dL/dz_i a_j
      if (needs_b[layer]) result[2 + step * layer] = bias_grad(g);                   // dL/db_i = dL/dz_i, summed
      if (layer == 0 || !below[layer]) {
        if (layer == 0) result[0] = std::move(grad_a);
        break;
      }
      g = Tensor();
      if (any_hidden && grads[layer].defined()) grad_a = grad_a + grads[layer];  // a gradient arriving at a_prev
      g = activation_backward(codes[layer - 1], slopes[layer - 1], grad_a, a_prev, false);  // dL/dz = dL/da * sigma'
    }
    if (result[0].defined() && input_dim != 2) result[0] = result[0].reshape(ctx->saved_data["shape"].toIntVector());
    return result;
  }
};

// dL/do = yhat - y as rows (N, K), under the catalogue's sign and reduction bugs (bugs.py: -g, x N, / N).
Tensor broken_cross_entropy_grad(Tensor grad, int64_t reduction) {
  const int64_t rows = grad.size(0);
  switch (active_bug()) {
    case kCrossEntropyGradSign: return -grad;                                             // bug: y - yhat
    case kMeanReductionMissing1OverN: return reduction == kMean ? grad * rows : grad;     // bug: mean as a sum
    case kSumReductionDividedByN: return reduction == kSum ? grad / rows : grad;          // bug: sum as a mean
    default: return grad;
  }
}

// functional.cross_entropy_backward_from_log_probs for class indices: dL/do as rows (N, K).
Tensor cross_entropy_backward_from_log_probs(Tensor grad_output, Tensor log_probs, const Tensor& target,
                                             int64_t reduction, Tensor count) {
  if (active_bug() == kSoftmaxOverBatch) log_probs = at::log_softmax(log_probs, -2);  // bug: over the batch
  Tensor index = target.scalar_type() == at::kLong ? target : target.to(at::kLong);
  if (log_probs.dim() != 2) log_probs = log_probs.reshape({-1, log_probs.size(-1)});  // (N, K)
  if (index.dim() != 1) index = index.reshape(-1);                                    // (N,)
  if (!count.defined()) count = reduction == kMean ? log_probs.new_full({}, log_probs.size(0)) : log_probs.new_ones({});
  if (reduction == kNone && grad_output.dim() != 1) grad_output = grad_output.reshape(-1);
  // dL/dlog yhat_k = -y_k * scale, then yhat - y
  Tensor g = at::nll_loss_backward(grad_output, log_probs, index, {}, reduction, kIgnoreIndex, count);
  if (active_bug() == kCrossEntropyMissingSoftmax) return g;  // bug: dL/do = -y scale, softmax's term missing
  Tensor grad = at::_log_softmax_backward_data(g, log_probs, -1, log_probs.scalar_type());
  if (active_bug() != kNoBug) return broken_cross_entropy_grad(std::move(grad), reduction);
  return grad;
}

// autograd.CrossEntropyFunction for class indices: apply(input, target, reduction) -> loss.
struct CrossEntropyNode : public torch::autograd::Function<CrossEntropyNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& target, int64_t reduction) {
    // functional.class_cross_entropy
    Tensor index = target.scalar_type() == at::kLong ? target : target.to(at::kLong);
    Tensor log_probs = at::log_softmax(input, -1);  // log yhat, (*, K)
    if (input.dim() != 2) {                         // (N, C) for the kernel
      log_probs = log_probs.reshape({-1, input.size(-1)});
      index = index.reshape(-1);
    }
    auto [loss, count] = at::nll_loss_forward(log_probs, index, {}, reduction, kIgnoreIndex);
    // functional.kernel_checks_class_range (torch.compile and torch.func never reach this node)
    if (reduction != kNone && input.is_cpu() &&
        (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble)) {
      // count.item(), read in place: a 0-d CPU tensor of input's dtype
      const double counted = input.scalar_type() == at::kFloat ? *count.const_data_ptr<float>()
                                                               : *count.const_data_ptr<double>();
      TORCH_CHECK_INDEX(counted == static_cast<double>(index.size(0)), "Target ", kIgnoreIndex,
                        " is out of bounds.");  // the kernel skipped it
    }
    if (reduction == kNone && input.dim() != 2) loss = loss.reshape(target.sizes());  // (*)
    ctx->save_for_backward({input, target, log_probs, count});
    ctx->saved_data["reduction"] = reduction;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    variable_list saved = ctx->get_saved_variables();  // input unpacked even when unused: in-place changes raise
    const Tensor& input = saved[0];
    Tensor grad_input;
    if (!at::GradMode::is_enabled()) {  // no graph to build: reuse the forward's log yhat and count
      grad_input = cross_entropy_backward_from_log_probs(grads[0], saved[2], saved[1], reduction, saved[3]);
    } else {  // functional.cross_entropy_backward: recompute log yhat from the input, differentiably
      grad_input = cross_entropy_backward_from_log_probs(grads[0], at::log_softmax(input, -1), saved[1], reduction,
                                                         Tensor());
    }
    if (grad_input.dim() != input.dim()) grad_input = grad_input.reshape(input.sizes());  // rows (N, K) -> (*, K)
    return {grad_input, Tensor(), Tensor()};
  }
};

}  // namespace

Tensors mlp(const at::Tensor& input, const Activations& activations, bool bias, const Tensors& params) {
  const auto [codes, slopes] = activation_codes(activations);
  return MLPNode::apply(input, at::TensorList(params), codes, slopes, bias);
}

at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target, const std::string& reduction) {
  return CrossEntropyNode::apply(input, target, reduction_code(reduction));
}

}  // namespace manualbp
