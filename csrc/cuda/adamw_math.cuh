// The AdamW maths of one element and its per-module scalars, in the order and with the roundings of
// misa_kernels/backends/torch_ref.py run in float32 on CUDA: each torch op there rounds once, and
// lerp and addcmul fuse their multiply-add as PyTorch's CUDA kernels do (aten/src/ATen/native/
// Lerp.h, DeviceAddCmulCdiv.cuh). Scalars are formed in double, as the reference forms them from
// float64 tensors, then rounded to float.
//
// __host__ __device__ so that the maths can be checked on a machine without a GPU. The explicit
// _rn operations keep nvcc from contracting a multiply and an add that torch rounds separately;
// the host path must likewise be compiled without FMA contraction (-ffp-contract=off).
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "kernels.cuh"

namespace misa::cuda {

__host__ __device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__host__ __device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__host__ __device__ __forceinline__ float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
__host__ __device__ __forceinline__ float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
__host__ __device__ __forceinline__ float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
__host__ __device__ __forceinline__ float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
__host__ __device__ __forceinline__ double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// What one block needs to update the elements of one module, rounded to float once.
struct AdamWScalars {
  float clip;  // gradient factor (1 without clipping)
  bool maximize;
  float decay;                 // 1 - lr * weight_decay
  float lerp_weight;           // 1 - beta1
  float lerp_weight_from_end;  // 1 - lerp_weight, used when lerp_weight >= 0.5 (torch's lerp)
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  float step_size;              // lr / (1 - beta1^t)
  float eps;
};

// t is the module's step count after this update (steps[m] + 1).
__host__ __device__ inline AdamWScalars adamw_scalars(const AdamWHyper& hyper, double lr, double t,
                                                      float clip) {
  AdamWScalars s;
  s.clip = clip;
  s.maximize = hyper.maximize;
  s.decay = static_cast<float>(1.0 - mul_rn(lr, hyper.weight_decay));
  s.lerp_weight = static_cast<float>(1.0 - hyper.beta1);
  s.lerp_weight_from_end = 1.0f - s.lerp_weight;
  s.beta2 = static_cast<float>(hyper.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - hyper.beta2);
  s.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(hyper.beta2, t)));
  s.step_size = static_cast<float>(lr / (1.0 - pow(hyper.beta1, t)));
  s.eps = static_cast<float>(hyper.eps);
  return s;
}

// One AdamW update of weight w with moments m, v and raw gradient `grad`, in place:
//   g = clip * grad (negated to maximize); w *= decay; m = lerp(m, g, 1 - beta1);
//   v = beta2 * v + (1 - beta2) * g * g; w -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
__host__ __device__ __forceinline__ void adamw_update(float& w, float& m, float& v, float grad,
                                                      const AdamWScalars& s) {
  float g = mul_rn(grad, s.clip);
  if (s.maximize) g = -g;
  w = mul_rn(w, s.decay);
  const float towards_g = sub_rn(g, m);
  m = s.lerp_weight < 0.5f ? fma_rn(s.lerp_weight, towards_g, m)
                           : fma_rn(-towards_g, s.lerp_weight_from_end, g);
  v = fma_rn(s.one_minus_beta2, mul_rn(g, g), mul_rn(v, s.beta2));
  const float denom = add_rn(div_rn(sqrt_rn(v), s.bias_correction2_sqrt), s.eps);
  w = sub_rn(w, mul_rn(s.step_size, div_rn(m, denom)));
}

}  // namespace misa::cuda
