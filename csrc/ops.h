// Declarations of the compiled kernels: misa::cpu (module misa_kernels._cpu_<capability>) and
// misa::cuda (module misa_kernels._C). Python wrappers in misa_kernels/backends/{cpu,cuda}.py
// validate arguments first; the C++ side re-checks what it relies on (devices, dtypes,
// contiguity, lengths) with TORCH_CHECK, so a direct call cannot read out of bounds either.
// Semantics: see misa_kernels/__init__.py (grad_sq_norms, adamw_step_);
// misa_kernels/backends/torch_ref.py is the reference implementation.
#pragma once

#include <optional>
#include <vector>

#include <torch/extension.h>

// Both backends implement the same two functions:
//
// grad_sq_norms returns {module_sq_norms [M], total_norm []} in float64 (a finite gradient has a
// finite norm) and {clip_coef [], found_inf []} in float32. accum_rule: 0 = "sq" (accum += w *
// s_m), 1 = "clipped_norm" (accum += w * sqrt(s_m) * clip_coef).
//
// adamw_step_: lr_tensor (a one-element float32 or float64 tensor), when given, is read instead of
// lr (on the device when it lives there); steps, clip_coef and found_inf are float32;
// sq_norms_out is float64.
#define MISA_DECLARE_OPS                                                                         \
  std::vector<at::Tensor> grad_sq_norms(                                                         \
      const std::vector<at::Tensor>& grads, const std::vector<int64_t>& module_ids,              \
      int64_t num_modules, std::optional<double> max_norm,                                       \
      const std::optional<at::Tensor>& accum, const std::optional<at::Tensor>& accum_count,      \
      const std::optional<at::Tensor>& accum_weight, int64_t accum_rule);                        \
  void adamw_step_(                                                                              \
      const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,               \
      const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,       \
      const at::Tensor& steps, const std::vector<int64_t>& module_ids, double lr,                \
      const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,        \
      double weight_decay, bool maximize,                                                        \
      const std::optional<std::vector<at::Tensor>>& master_params,                               \
      const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& found_inf,    \
      const std::optional<at::Tensor>& sq_norms_out);

namespace misa {
namespace cpu {
MISA_DECLARE_OPS
}  // namespace cpu
#ifdef MISA_WITH_CUDA
namespace cuda {
MISA_DECLARE_OPS
}  // namespace cuda
#endif
}  // namespace misa

#undef MISA_DECLARE_OPS
