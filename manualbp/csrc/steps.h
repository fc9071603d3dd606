// The optimizer steps in C++: the twin of manualbp/optim_steps.py (the one source of the update formulas),
// line for line with the same ATen kernels in the same order, so the fused trainer's C++ loop (fused.cpp)
// and its Python path give the same numbers bit for bit. Any csrc file that updates parameters includes this.
#pragma once
#include "native.h"

#include <cmath>

namespace manualbp {

// torch.optim.SGD's settings and state (FusedTrainer's lr, momentum, ..., momentum_buffers, _grad_blocks).
struct SGD {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
  Tensors momentum_buffers;  // empty until the first step with momentum
  Tensors grad_blocks;       // dL/d[W | b] (not used by plain SGD)
  bool plain() const { return momentum == 0 && weight_decay == 0; }
};

// optim_steps.sgd_step_ (the per-tensor ops of the slow _foreach path are the Python step's kernels)
inline void sgd_update(const Tensors& params, SGD& sgd) {
  Tensors grads = sgd.grad_blocks;
  if (sgd.weight_decay != 0) {  // g + wd p (the catalogue's weight_decay_sign: g - wd p)
    grads = at::_foreach_add(grads, params, active_bug() == kWeightDecaySign ? -sgd.weight_decay : sgd.weight_decay);
  }
  Tensors direction = grads;
  if (sgd.momentum != 0) {
    if (sgd.momentum_buffers.empty()) {
      for (const auto& g : grads) sgd.momentum_buffers.push_back(g.clone());  // buf = g (first step)
    } else {
      if (active_bug() != kMomentumNotDecayed) at::_foreach_mul_(sgd.momentum_buffers, sgd.momentum);  // buf = m buf
      at::_foreach_add_(sgd.momentum_buffers, grads, 1 - sgd.dampening);    //       + (1 - d) g
    }
    const double ahead = active_bug() == kNesterovMissingMomentumFactor ? 1.0 : sgd.momentum;  // bug: g + buf
    direction = sgd.nesterov ? at::_foreach_add(grads, sgd.momentum_buffers, ahead)  // g + m buf
                             : sgd.momentum_buffers;                                  // buf
  }
  at::_foreach_add_(params, direction, -sgd.lr);  // p = p - lr g
}

// torch.optim.Adam / AdamW's settings and state (FusedTrainer's lr, betas, eps, weight_decay, adam_state).
struct Adam {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled;            // AdamW: p = (1 - lr wd) p instead of g + wd p
  Tensors exp_avg, exp_avg_sq;  // m, v: empty until the first step (then zeros)
  int64_t step;              // t, the steps taken
};

// optim_steps.adam_step_, from the gradients ``grads`` (which stay the raw dL/dp).
inline void adam_update(const Tensors& params, const Tensors& grads, Adam& adam) {
  if (adam.exp_avg.empty() || adam.exp_avg_sq.empty()) {
    adam.exp_avg.clear();
    adam.exp_avg_sq.clear();
    for (const auto& p : params) {
      adam.exp_avg.push_back(at::zeros_like(p));     // m = 0
      adam.exp_avg_sq.push_back(at::zeros_like(p));  // v = 0
    }
  }
  adam.step += 1;                                                    // t = t + 1
  const double t = static_cast<double>(adam.step);
  double c1 = 1 - std::pow(adam.beta1, t), c2 = 1 - std::pow(adam.beta2, t);  // 1 - beta1^t, 1 - beta2^t
  if (active_bug() == kAdamBiasCorrectionMissing) c1 = c2 = 1;  // bug: no bias correction
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i], g = grads[i], m = adam.exp_avg[i], v = adam.exp_avg_sq[i];
    if (adam.weight_decay != 0) {
      if (adam.decoupled) {
        p.mul_(1 - adam.lr * adam.weight_decay);  // p = (1 - lr wd) p
      } else {
        g = g.add(p, adam.weight_decay);  // g + wd p
      }
    }
    m.lerp_(g, 1 - adam.beta1);                       // m = beta1 m + (1 - beta1) g
    v.mul_(adam.beta2).add_(g * g, 1 - adam.beta2);   // v = beta2 v + (1 - beta2) g^2
    at::Tensor denom = (v.sqrt() / std::pow(c2, 0.5)).add_(adam.eps);  // sqrt(v / c2) + eps
    p.add_(m / denom, -adam.lr / c1);                 // p = p - lr (m / c1) / (sqrt(v / c2) + eps)
  }
}

}  // namespace manualbp
