// manualbp's compiled kernels: what the sources share. Only bindings.cpp includes <torch/extension.h>
// (pybind11 and torch's Python bindings, ~45 s to compile); the kernels need ATen alone (~13 s).
#pragma once
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace manualbp {

using Tensors = std::vector<at::Tensor>;
using Activations = std::vector<std::pair<std::string, double>>;  // (name, negative_slope) per hidden layer

enum Activation : int64_t { kSigmoid = 0, kTanh = 1, kReLU = 2, kLeakyReLU = 3, kIdentity = 4 };

inline int64_t activation_code(const std::string& name) {
  if (name == "sigmoid") return kSigmoid;
  if (name == "tanh") return kTanh;
  if (name == "relu") return kReLU;
  if (name == "leaky_relu") return kLeakyReLU;
  if (name == "identity") return kIdentity;
  TORCH_CHECK_VALUE(false, "unknown activation ", name);
}

// Activation codes and negative slopes, one per hidden layer.
inline std::pair<std::vector<int64_t>, std::vector<double>> activation_codes(const Activations& activations) {
  std::pair<std::vector<int64_t>, std::vector<double>> out;
  for (const auto& [name, slope] : activations) {
    out.first.push_back(activation_code(name));
    out.second.push_back(slope);
  }
  return out;
}

// The mutation catalogue's runtime switch (manualbp/verify/bugs.py: inject_bug sets it, through manualbp.native).
// One code per catalogue bug whose formula has a site in these sources, 0 = none; each site asks
// active_bug() (one relaxed load and one integer compare: nothing measurable when no bug is set) and, for its
// bug, computes the same wrong value as the bug's Python patch. X(enum name, catalogue name), in code order:
// the binding's bug_codes() dict is built from this list, the only place the names meet the codes.
#define MANUALBP_BUGS(X)                                                          \
  X(kSigmoidMissingDerivative, "sigmoid_missing_derivative")                      \
  X(kTanhDerivativePlus, "tanh_derivative_plus")                                  \
  X(kReLUDerivativeOnes, "relu_derivative_ones")                                  \
  X(kLeakyReLUSlopeMissing, "leaky_relu_slope_missing")                           \
  X(kIdentityDerivativeMasked, "identity_derivative_masked")                      \
  X(kCrossEntropyGradSign, "cross_entropy_grad_sign")                             \
  X(kCrossEntropyMissingSoftmax, "cross_entropy_missing_softmax")                 \
  X(kSoftmaxOverBatch, "softmax_over_batch")                                      \
  X(kMeanReductionMissing1OverN, "mean_reduction_missing_1_over_n")               \
  X(kSumReductionDividedByN, "sum_reduction_divided_by_n")                        \
  X(kWeightGradTransposed, "weight_grad_transposed")                              \
  X(kBiasGradNotSummed, "bias_grad_not_summed")                                   \
  X(kBiasGradMean, "bias_grad_mean")                                              \
  X(kInputGradMissing, "input_grad_missing")                                      \
  X(kInputGradWeightTransposed, "input_grad_weight_transposed")                   \
  X(kWeightDecaySign, "weight_decay_sign")                                        \
  X(kMomentumNotDecayed, "momentum_not_decayed")                                  \
  X(kNesterovMissingMomentumFactor, "nesterov_missing_momentum_factor")            \
  X(kAdamBiasCorrectionMissing, "adam_bias_correction_missing")

#define MANUALBP_BUG_CODE(code, name) code,
enum Bug : int64_t { kNoBug = 0, MANUALBP_BUGS(MANUALBP_BUG_CODE) kBugEnd };
#undef MANUALBP_BUG_CODE

inline std::atomic<int64_t>& bug_switch() {
  static std::atomic<int64_t> bug{kNoBug};  // one per process: an inline function's static is shared by every source
  return bug;
}
inline int64_t active_bug() { return bug_switch().load(std::memory_order_relaxed); }
inline void set_bug(int64_t code) {
  TORCH_CHECK_VALUE(code >= kNoBug && code < kBugEnd, "set_bug: code must be in [0, ", kBugEnd - 1, "], got ", code);
  bug_switch().store(code, std::memory_order_relaxed);
}

// The catalogue's broken sigma' for activation ``code``, from dL/da ``g`` and the saved output a (bugs.py's
// _activation_patches); nullopt where the active bug is not this activation's (the right formula runs).
inline std::optional<at::Tensor> broken_activation_backward(int64_t code, const at::Tensor& g, const at::Tensor& a) {
  switch (active_bug()) {
    case kSigmoidMissingDerivative:
      if (code == kSigmoid) return g.clone();  // bug: g, the a (1 - a) factor missing
      break;
    case kTanhDerivativePlus:
      if (code == kTanh) return g * (a * a + 1);  // bug: g (1 + a^2)
      break;
    case kReLUDerivativeOnes:
      if (code == kReLU) return g * a.ge(0).to(g.scalar_type());  // bug: g [a >= 0]
      break;
    case kLeakyReLUSlopeMissing:
      if (code == kLeakyReLU) return g * a.gt(0).to(g.scalar_type());  // bug: g [a > 0], slope dropped
      break;
    case kIdentityDerivativeMasked:
      if (code == kIdentity) return g * a.gt(0).to(g.scalar_type());  // bug: g [a > 0] on a linear layer
      break;
    default: break;
  }
  return std::nullopt;
}

// W as dL/da_prev = dL/dz W reads it, under the catalogue's input-gradient bugs (bugs.py's input_weight).
inline at::Tensor broken_input_weight(const at::Tensor& weight) {
  switch (active_bug()) {
    case kInputGradMissing: return at::zeros_like(weight);                       // bug: dL/da_prev = 0
    case kInputGradWeightTransposed: return weight.t().reshape(weight.sizes());  // bug: W^T forced into (out, in)
    default: return weight;
  }
}

// The activations: the C++ twin of the registry's built-in specs (manualbp/functional.py), the one place in C++.
// a = sigma(z) written into ``out`` (``out`` may be ``z``: the module's forward overwrites z in place).
inline void activation_into(int64_t code, double slope, const at::Tensor& z, at::Tensor& out) {
  switch (code) {
    case kSigmoid: at::sigmoid_out(out, z); break;                // a = 1 / (1 + exp(-z))
    case kTanh: at::tanh_out(out, z); break;                      // a = tanh(z)
    case kReLU: at::clamp_min_out(out, z, 0); break;              // a = max(z, 0)
    case kLeakyReLU: at::leaky_relu_out(out, z, slope); break;    // a = z or slope z
    default: if (!out.is_same(z)) out.copy_(z);                   // a = z
  }
}

// dL/dz = dL/da * sigma'(z) from the saved output a: written into ``g`` (``inplace``: the fused loop) or as a new,
// differentiable tensor (the module's autograd node, which double backward differentiates again).
inline at::Tensor activation_backward(int64_t code, double slope, at::Tensor g, const at::Tensor& a, bool inplace) {
  if (active_bug() != kNoBug) {
    if (auto broken = broken_activation_backward(code, g, a)) return inplace ? g.copy_(*broken) : *broken;  // bug
  }
  switch (code) {
    case kSigmoid: return inplace ? at::sigmoid_backward_out(g, g, a) : at::sigmoid_backward(g, a);  // g a (1 - a)
    case kTanh: return inplace ? at::tanh_backward_out(g, g, a) : at::tanh_backward(g, a);            // g (1 - a^2)
    case kReLU: return inplace ? at::threshold_backward_out(g, g, a, 0) : at::threshold_backward(g, a, 0);  // g [a > 0]
    case kLeakyReLU:  // g ([a > 0] + slope [a <= 0])
      return inplace ? at::leaky_relu_backward_out(g, g, a, slope, true) : at::leaky_relu_backward(g, a, slope, true);
    default: return g;  // g 1
  }
}

// fused.cpp: FusedTrainer.step_many's loop; returns (the batch losses / loss_scale, the momentum buffers,
// Adam's m and v). The optimizer steps live in steps.h.
std::tuple<at::Tensor, Tensors, Tensors, Tensors> fused_step_many(
    const Tensors& blocks, const Tensors& weights, const Activations& activations, const std::string& loss,
    double lr, double momentum, double dampening, double weight_decay, bool nesterov, Tensors momentum_buffers,
    Tensors grad_blocks, const std::string& optimizer, double beta1, double beta2, double eps, Tensors exp_avg,
    Tensors exp_avg_sq, int64_t adam_step, const at::Tensor& input, const at::Tensor& target, int64_t batch_size, const Tensors& full_z,
    const Tensors& full_act, const Tensors& full_a, const Tensors& full_grad, const at::Tensor& full_out,
    double full_scale, const Tensors& last_z, const Tensors& last_act, const Tensors& last_a,
    const Tensors& last_grad, const at::Tensor& last_out, double last_scale);

// module.cpp: autograd.MLPFunction.apply(input, activations, bias, *params) as a C++ autograd node.
Tensors mlp(const at::Tensor& input, const Activations& activations, bool bias, const Tensors& params);

// module.cpp: autograd.CrossEntropyFunction.apply(input, target, reduction), class indices, as a C++ node.
at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target, const std::string& reduction);

}  // namespace manualbp
