// misa::cpu::grad_sq_norms: per-module squared gradient norms over many tensors in one parallel
// pass (float32 blocks summed in double; a chunk that overflows float32 is summed again in
// double), then the total norm, clip coefficient, non-finite flag and importance accumulation on
// the host (all inputs are in host memory, so reading the results there costs nothing).
#include <cmath>

#include "cpu/multi_tensor.h"
#include "ops.h"

namespace misa::cpu {
namespace {

// Added to the total norm before dividing, as torch.nn.utils.clip_grad_norm_ and the reference.
constexpr double kClipEps = 1e-6;

enum AccumRule : int64_t { kAccumSq = 0, kAccumClippedNorm = 1 };

}  // namespace

std::vector<at::Tensor> grad_sq_norms(
    const std::vector<at::Tensor>& grads, const std::vector<int64_t>& module_ids,
    int64_t num_modules, std::optional<double> max_norm, const std::optional<at::Tensor>& accum,
    const std::optional<at::Tensor>& accum_count, const std::optional<at::Tensor>& accum_weight,
    int64_t accum_rule) {
  TORCH_CHECK(module_ids.size() == grads.size(), "module_ids has ", module_ids.size(), " entries but grads has ",
              grads.size());
  TORCH_CHECK(num_modules >= 0, "num_modules must be non-negative, got ", num_modules);
  TORCH_CHECK(accum_rule == kAccumSq || accum_rule == kAccumClippedNorm, "accum_rule must be 0 (sq) or 1 ",
              "(clipped_norm), got ", accum_rule);
  TORCH_CHECK(!max_norm.has_value() || *max_norm > 0, "max_norm must be positive, got ", max_norm.value_or(0));
  check_tensor_list(grads, "grads", at::ScalarType::Undefined);
  check_module_ids(module_ids, num_modules, "num_modules");
  check_vector(accum, "accum", num_modules, {at::kFloat});
  check_vector(accum_count, "accum_count", num_modules, {at::kFloat});
  check_vector(accum_weight, "accum_weight", num_modules, {at::kFloat});

  std::vector<int64_t> numels(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) numels[i] = grads[i].numel();
  const std::vector<Chunk> chunks = make_chunks(numels);
  const std::vector<double> sums = module_sums(chunks, chunk_sums_of_squares(grads, chunks), module_ids, num_modules);

  // float64 sums (a finite gradient has a finite norm), float32 coefficient and flag, as torch_ref
  at::Tensor module_sq_norms = at::empty({num_modules}, at::TensorOptions().dtype(at::kDouble));
  double* sq = module_sq_norms.data_ptr<double>();
  double total_sq = 0.0;
  for (int64_t m = 0; m < num_modules; ++m) {
    sq[m] = sums[m];
    total_sq += sums[m];
  }
  const double total_norm = std::sqrt(total_sq);
  const bool found_inf = !std::isfinite(total_sq);
  float clip_coef = 1.f;
  if (max_norm.has_value() && !found_inf) {
    clip_coef = static_cast<float>(std::min(1.0, *max_norm / (total_norm + kClipEps)));
  }

  if (!found_inf && (accum.has_value() || accum_count.has_value())) {
    std::vector<bool> present(num_modules, false);
    for (int64_t m : module_ids) present[m] = true;
    float* acc = accum.has_value() ? accum->data_ptr<float>() : nullptr;
    float* count = accum_count.has_value() ? accum_count->data_ptr<float>() : nullptr;
    const float* weight = accum_weight.has_value() ? accum_weight->data_ptr<float>() : nullptr;
    for (int64_t m = 0; m < num_modules; ++m) {
      if (!present[m]) continue;
      if (acc != nullptr) {
        // in double, rounded once to the float32 buffer, as torch_ref
        double value = accum_rule == kAccumSq ? sq[m] : std::sqrt(sq[m]) * static_cast<double>(clip_coef);
        if (weight != nullptr) value *= static_cast<double>(weight[m]);
        acc[m] += static_cast<float>(value);
      }
      if (count != nullptr) count[m] += 1.f;
    }
  }

  const auto options = at::TensorOptions().dtype(at::kFloat);
  return {module_sq_norms, at::scalar_tensor(total_norm, at::TensorOptions().dtype(at::kDouble)),
          at::scalar_tensor(clip_coef, options), at::scalar_tensor(found_inf ? 1.f : 0.f, options)};
}

}  // namespace misa::cpu
