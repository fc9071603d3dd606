// manualbp's compiled kernels: what the sources share. Only bindings.cpp includes <torch/extension.h>
// (pybind11 and torch's Python bindings, ~45 s to compile); the kernels need ATen alone (~13 s).
#pragma once
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstdint>
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

// a = sigma(z) written into ``out``: the kernels of manualbp.functional.activation.
inline void activation_into(int64_t code, double slope, const at::Tensor& z, at::Tensor& out) {
  switch (code) {
    case kSigmoid: at::sigmoid_out(out, z); break;                // a = 1 / (1 + exp(-z))
    case kTanh: at::tanh_out(out, z); break;                      // a = tanh(z)
    case kReLU: at::clamp_min_out(out, z, 0); break;              // a = max(z, 0)
    case kLeakyReLU: at::leaky_relu_out(out, z, slope); break;    // a = z or slope z
    default: out.copy_(z);                                        // a = z
  }
}

// g <- g * sigma'(z), in place, from the saved output a: the kernels of manualbp.functional.activation_backward.
inline void activation_backward_(int64_t code, double slope, at::Tensor& g, const at::Tensor& a) {
  switch (code) {
    case kSigmoid: at::sigmoid_backward_out(g, g, a); break;                     // g a (1 - a)
    case kTanh: at::tanh_backward_out(g, g, a); break;                           // g (1 - a^2)
    case kReLU: at::threshold_backward_out(g, g, a, 0); break;                   // g [a > 0]
    case kLeakyReLU: at::leaky_relu_backward_out(g, g, a, slope, true); break;   // g (1 or slope)
    default: break;                                                              // g 1
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
