// misa::cpu::adamw_step_: AdamW over many tensors in one parallel pass over fixed-size chunks,
// with per-module step counts, a clip coefficient and skip flag read on the host (all inputs are
// in host memory), optional fp32 master weights, and the optional per-module sum of squared
// gradients read in the same pass (float64; a chunk whose float32 sum overflows is summed again
// in double).
//
// The arithmetic is torch.optim.AdamW's (the reference backend's) in fp32, vectorised the way
// PyTorch's fused CPU Adam kernel is (aten/src/ATen/native/cpu/FusedAdamKernel.cpp): bias
// corrections in double once per module, then per element, with torch's lerp and addcmul forms
//   w = w * (1 - lr * wd);  m = lerp(m, g, 1 - beta1);  v = beta2 * v + ((1 - beta2) * g) * g;
//   w = w - step_size * (m / (sqrt(v) / sqrt(1 - beta2^t) + eps)),  step_size = lr / (1 - beta1^t).
#include <cmath>

#include "cpu/multi_tensor.h"
#include "ops.h"

namespace misa::cpu {
namespace {

// The fp32 constants shared by every element of a call.
struct AdamWScalars {
  FloatVec grad_scale;  // clip_coef, negated when maximising
  FloatVec decay;       // 1 - lr * weight_decay
  // lerp(m, g, w) with w = 1 - beta1 is m + w * (g - m) for |w| < 0.5 and g + (w - 1) * (g - m)
  // otherwise, as torch's lerp kernel, which keeps the result accurate at both ends.
  bool lerp_from_m;
  FloatVec lerp_coef;
  FloatVec beta2, one_minus_beta2, eps;
};

// The bias-corrected factors of one module at its step t = steps[m] + 1.
struct ModuleScalars {
  float step_size;              // lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

// Pointers to the tensors of one call, indexed like params.
template <typename param_t, typename grad_t>
struct AdamWTensors {
  std::vector<param_t*> params;
  std::vector<float*> masters;
  std::vector<const grad_t*> grads;
  std::vector<float*> exp_avgs;
  std::vector<float*> exp_avg_sqs;
};

// One update of a vector of elements in place; `g` is the raw gradient.
C10_ALWAYS_INLINE void update(FloatVec& w, FloatVec& m, FloatVec& v, FloatVec g, const AdamWScalars& k,
                              const FloatVec& step_size, const FloatVec& bias_correction2_sqrt) {
  g = g * k.grad_scale;
  w = w * k.decay;
  m = at::vec::fmadd(k.lerp_coef, g - m, k.lerp_from_m ? m : g);
  v = at::vec::fmadd(k.one_minus_beta2 * g, g, v * k.beta2);
  const FloatVec denom = v.sqrt() / bias_correction2_sqrt + k.eps;
  w = w - step_size * (m / denom);
}

// Updates the `count` (at most kStepElements) elements from offset j of one tensor's pointers;
// adds their squared raw gradients to sq_lo, sq_hi when kSqNorms.
template <typename param_t, typename grad_t, bool kMaster, bool kSqNorms>
C10_ALWAYS_INLINE void update_step(param_t* param, float* master, const grad_t* grad, float* exp_avg,
                                   float* exp_avg_sq, int64_t j, int64_t count, const AdamWScalars& k,
                                   const FloatVec& step_size, const FloatVec& bias_correction2_sqrt,
                                   FloatVec& sq_lo, FloatVec& sq_hi) {
  FloatVec g_lo, g_hi, w_lo, w_hi, m_lo, m_hi, v_lo, v_hi;
  load_floats(grad + j, count, g_lo, g_hi);
  if constexpr (kSqNorms) {
    sq_lo = at::vec::fmadd(g_lo, g_lo, sq_lo);
    sq_hi = at::vec::fmadd(g_hi, g_hi, sq_hi);
  }
  if constexpr (kMaster) {
    load_floats(master + j, count, w_lo, w_hi);
  } else {
    load_floats(param + j, count, w_lo, w_hi);
  }
  load_floats(exp_avg + j, count, m_lo, m_hi);
  load_floats(exp_avg_sq + j, count, v_lo, v_hi);
  update(w_lo, m_lo, v_lo, g_lo, k, step_size, bias_correction2_sqrt);
  update(w_hi, m_hi, v_hi, g_hi, k, step_size, bias_correction2_sqrt);
  store_floats(exp_avg + j, count, m_lo, m_hi);
  store_floats(exp_avg_sq + j, count, v_lo, v_hi);
  if constexpr (kMaster) store_floats(master + j, count, w_lo, w_hi);
  store_floats(param + j, count, w_lo, w_hi);
}

// Updates elements [begin, begin + n) of tensor i; returns the sum of their squared raw
// gradients when kSqNorms (else 0), summed in fp32 over blocks of kBlockSteps vector steps and
// in double across blocks.
template <typename param_t, typename grad_t, bool kMaster, bool kSqNorms>
double adamw_chunk(const AdamWTensors<param_t, grad_t>& t, int64_t i, int64_t begin, int64_t n,
                   const AdamWScalars& k, const ModuleScalars& module) {
  param_t* param = t.params[i] + begin;
  float* master = kMaster ? t.masters[i] + begin : nullptr;
  const grad_t* grad = t.grads[i] + begin;
  float* exp_avg = t.exp_avgs[i] + begin;
  float* exp_avg_sq = t.exp_avg_sqs[i] + begin;
  const FloatVec step_size(module.step_size);
  const FloatVec bias_correction2_sqrt(module.bias_correction2_sqrt);
  double sq_total = 0.0;
  for (int64_t block = 0; block < n; block += kBlockSteps * kStepElements) {
    const int64_t block_end = std::min(n, block + kBlockSteps * kStepElements);
    FloatVec sq_lo(0.f), sq_hi(0.f);
    int64_t j = block;
    for (; j + kStepElements <= block_end; j += kStepElements) {
      update_step<param_t, grad_t, kMaster, kSqNorms>(param, master, grad, exp_avg, exp_avg_sq, j, kStepElements,
                                                      k, step_size, bias_correction2_sqrt, sq_lo, sq_hi);
    }
    if (j < block_end) {
      update_step<param_t, grad_t, kMaster, kSqNorms>(param, master, grad, exp_avg, exp_avg_sq, j, block_end - j,
                                                      k, step_size, bias_correction2_sqrt, sq_lo, sq_hi);
    }
    if constexpr (kSqNorms) sq_total += sum_lanes(sq_lo + sq_hi);
  }
  return sq_total;
}

// Overwrites the float64 `out` with the per-module sums, 0 where no tensor belongs.
void write_module_sums(const at::Tensor& out, const std::vector<double>& sums) {
  std::copy(sums.begin(), sums.end(), out.data_ptr<double>());
}

}  // namespace

void adamw_step_(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
    const at::Tensor& steps, const std::vector<int64_t>& module_ids, double lr,
    const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
    double weight_decay, bool maximize, const std::optional<std::vector<at::Tensor>>& master_params,
    const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& sq_norms_out) {
  const size_t count = params.size();
  const auto check_length = [count](size_t length, const char* name) {
    TORCH_CHECK(length == count, name, " has ", length, " entries but params has ", count);
  };
  check_length(grads.size(), "grads");
  check_length(exp_avgs.size(), "exp_avgs");
  check_length(exp_avg_sqs.size(), "exp_avg_sqs");
  check_length(module_ids.size(), "module_ids");
  if (master_params.has_value()) check_length(master_params->size(), "master_params");
  TORCH_CHECK(steps.device().is_cpu() && steps.dim() == 1 && steps.is_contiguous(),
              "steps must be a contiguous 1-D CPU tensor, got shape ", steps.sizes(), " on ", steps.device());
  TORCH_CHECK(steps.scalar_type() == at::kFloat, "steps has dtype ", steps.scalar_type(), "; expected float32");
  const int64_t num_modules = steps.numel();
  check_module_ids(module_ids, num_modules, "steps.numel()");
  check_tensor_list(params, "params", at::ScalarType::Undefined);
  std::vector<int64_t> numels(count);
  for (size_t i = 0; i < count; ++i) numels[i] = params[i].numel();
  check_tensor_list(grads, "grads", at::ScalarType::Undefined, &numels);
  check_tensor_list(exp_avgs, "exp_avgs", at::kFloat, &numels);
  check_tensor_list(exp_avg_sqs, "exp_avg_sqs", at::kFloat, &numels);
  if (master_params.has_value()) check_tensor_list(*master_params, "master_params", at::kFloat, &numels);
  check_vector(sq_norms_out, "sq_norms_out", num_modules, {at::kDouble});
  const bool skip = found_inf.has_value() && read_scalar(*found_inf, "found_inf") != 0.0;
  const float clip = clip_coef.has_value() ? static_cast<float>(read_scalar(*clip_coef, "clip_coef")) : 1.f;
  if (lr_tensor.has_value()) lr = read_scalar(*lr_tensor, "lr_tensor", /*allow_double=*/true);

  const std::vector<Chunk> chunks = make_chunks(numels);
  if (skip) {  // nothing is written but the documented norms
    if (sq_norms_out.has_value()) {
      write_module_sums(*sq_norms_out,
                        module_sums(chunks, chunk_sums_of_squares(grads, chunks), module_ids, num_modules));
    }
    return;
  }

  std::vector<bool> present(num_modules, false);
  for (int64_t m : module_ids) present[m] = true;
  std::vector<ModuleScalars> modules(num_modules);
  for (int64_t m = 0; m < num_modules; ++m) {
    if (!present[m]) continue;
    const double t = static_cast<double>(steps.const_data_ptr<float>()[m]) + 1.0;
    modules[m] = {static_cast<float>(lr / (1.0 - std::pow(beta1, t))),
                  static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)))};
  }
  const float lerp_weight = static_cast<float>(1.0 - beta1);
  const bool lerp_from_m = std::abs(lerp_weight) < 0.5f;
  const AdamWScalars scalars{
      FloatVec(maximize ? -clip : clip),
      FloatVec(static_cast<float>(1.0 - lr * weight_decay)),
      lerp_from_m,
      FloatVec(lerp_from_m ? lerp_weight : lerp_weight - 1.f),
      FloatVec(static_cast<float>(beta2)),
      FloatVec(static_cast<float>(1.0 - beta2)),
      FloatVec(static_cast<float>(eps)),
  };

  const bool with_master = master_params.has_value();
  const bool with_sq_norms = sq_norms_out.has_value();
  std::vector<double> chunk_sums(with_sq_norms ? chunks.size() : 0);
  if (!chunks.empty()) {
    dispatch_float_types(params[0].scalar_type(), "params", [&](auto param_tag) {
      dispatch_float_types(grads[0].scalar_type(), "grads", [&](auto grad_tag) {
        using param_t = decltype(param_tag);
        using grad_t = decltype(grad_tag);
        AdamWTensors<param_t, grad_t> tensors;
        for (size_t i = 0; i < count; ++i) {
          tensors.params.push_back(params[i].data_ptr<param_t>());
          tensors.masters.push_back(with_master ? (*master_params)[i].data_ptr<float>() : nullptr);
          tensors.grads.push_back(grads[i].const_data_ptr<grad_t>());
          tensors.exp_avgs.push_back(exp_avgs[i].data_ptr<float>());
          tensors.exp_avg_sqs.push_back(exp_avg_sqs[i].data_ptr<float>());
        }
        const auto run = [&](auto master_flag, auto sq_norms_flag) {
          constexpr bool kMaster = decltype(master_flag)::value;
          constexpr bool kSqNorms = decltype(sq_norms_flag)::value;
          at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
            for (int64_t c = first; c < last; ++c) {
              const Chunk& chunk = chunks[c];
              const double sq = adamw_chunk<param_t, grad_t, kMaster, kSqNorms>(
                  tensors, chunk.tensor, chunk.begin, chunk.size, scalars, modules[module_ids[chunk.tensor]]);
              if constexpr (kSqNorms) {
                // the gradient is only read, so an overflowed float32 sum can be redone in double
                chunk_sums[c] = std::isfinite(sq) ? sq
                    : sum_of_squares_double(tensors.grads[chunk.tensor] + chunk.begin, chunk.size);
              }
            }
          });
        };
        using Yes = std::true_type;
        using No = std::false_type;
        if (with_master) {
          with_sq_norms ? run(Yes{}, Yes{}) : run(Yes{}, No{});
        } else {
          with_sq_norms ? run(No{}, Yes{}) : run(No{}, No{});
        }
      });
    });
  }
  if (with_sq_norms) write_module_sums(*sq_norms_out, module_sums(chunks, chunk_sums, module_ids, num_modules));

  float* step_counts = steps.data_ptr<float>();
  for (int64_t m = 0; m < num_modules; ++m) {
    if (present[m]) step_counts[m] += 1.f;
  }
}

}  // namespace misa::cpu
