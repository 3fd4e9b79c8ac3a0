// Host side of the cuda backend (misa::cuda in ops.h): re-checks what the kernels rely on, builds
// the per-call work table in pinned host memory, copies it to the device and launches one kernel
// per op, all on the current stream under a guard for the tensors' device, with no host
// synchronisation. Only c10 CUDA headers are used (ATen/cuda/CUDAContext.h needs cuSPARSE headers).
#include "ops.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels.cuh"
#include "work_table.cuh"

namespace misa::cuda {
namespace {

FloatKind float_kind(at::ScalarType dtype, const char* what) {
  switch (dtype) {
    case at::kFloat:
      return FloatKind::kFloat32;
    case at::kHalf:
      return FloatKind::kFloat16;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(
      false, what, " has dtype ", dtype,
      "; the cuda backend takes float32, float16 and bfloat16 (float64 needs the 'torch' backend)");
}

// Checks element i of a tensor list: defined, dense, contiguous, on `device`, and, when `dtype` is
// given, of that dtype.
void check_list_tensor(const at::Tensor& t, const char* list, size_t i, const at::Device& device,
                       std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK(t.defined(), list, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, list, "[", i, "] is ", t.layout(),
              "; only dense tensors are supported");
  TORCH_CHECK(t.device() == device, list, "[", i, "] is on ", t.device(), " but the op runs on ", device);
  TORCH_CHECK(t.is_contiguous(), list, "[", i, "] is not contiguous");
  if (dtype.has_value()) {
    TORCH_CHECK_TYPE(t.scalar_type() == *dtype, list, "[", i, "] has dtype ", t.scalar_type(), "; expected ",
                     *dtype);
  }
}

// The float kind shared by every tensor of a list (float32 for an empty list: it has no chunks).
FloatKind uniform_float_kind(const std::vector<at::Tensor>& tensors, const char* list) {
  if (tensors.empty()) return FloatKind::kFloat32;
  const at::ScalarType dtype = tensors[0].scalar_type();
  for (size_t i = 1; i < tensors.size(); ++i) {
    TORCH_CHECK_TYPE(tensors[i].scalar_type() == dtype, list, " mixes dtypes: ", list, "[", i, "] is ",
                     tensors[i].scalar_type(), " but ", list, "[0] is ", dtype);
  }
  return float_kind(dtype, list);
}

// Checks an optional float32 buffer on `device`: a vector of `length` elements, or a one-element
// scalar when length is negative.
void check_float_buffer(const std::optional<at::Tensor>& t, const char* name, const at::Device& device,
                        int64_t length) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->defined(), name, " is undefined");
  TORCH_CHECK(t->layout() == at::kStrided && t->is_contiguous(), name, " must be a dense contiguous tensor");
  TORCH_CHECK(t->device() == device, name, " is on ", t->device(), " but the op runs on ", device);
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " has dtype ", t->scalar_type(),
                   "; expected float32");
  if (length < 0) {
    TORCH_CHECK(t->numel() == 1 && t->dim() <= 1, name, " must be a 0-dim tensor, got shape ", t->sizes());
  } else {
    TORCH_CHECK(t->dim() == 1 && t->numel() == length, name, " must have shape (", length, ",), got ",
                t->sizes());
  }
}

void check_module_ids(const std::vector<int64_t>& module_ids, int64_t num_modules, const char* bound) {
  for (size_t i = 0; i < module_ids.size(); ++i) {
    TORCH_CHECK(module_ids[i] >= 0 && module_ids[i] < num_modules, "module_ids[", i, "] = ", module_ids[i],
                " is outside [0, ", bound, "=", num_modules, ")");
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The work table of one call (layout: work_table.cuh). It is built in pinned host memory and
// copied to the device by one non-blocking copy on the current stream; torch's caching host
// allocator keeps the host buffer alive until that copy has run, and the device buffer goes back to
// torch's caching allocator after the launch, ordered on the same stream.
template <typename Entry>
class WorkTable {
 public:
  WorkTable(const std::vector<int64_t>& module_ids, const std::vector<int64_t>& numels, int64_t num_modules,
            const at::Device& device)
      : layout_(table_layout<Entry>(numels, num_modules)) {
    TORCH_CHECK(layout_.num_tensors <= kMaxTableIndex, "one call takes at most ", kMaxTableIndex,
                " tensors, got ", layout_.num_tensors);
    TORCH_CHECK(num_modules <= kMaxTableIndex, "one call takes at most ", kMaxTableIndex, " modules, got ",
                num_modules);
    TORCH_CHECK(layout_.num_chunks <= kMaxTableIndex, "the tensors make ", layout_.num_chunks, " chunks of ",
                kChunkSize, " elements; one call takes at most ", kMaxTableIndex);
    host_ = at::empty({static_cast<int64_t>(layout_.host_bytes)},
                      at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    device_ = at::empty({static_cast<int64_t>(layout_.device_bytes)},
                        at::TensorOptions().dtype(at::kByte).device(device));
    TORCH_INTERNAL_ASSERT(aligned16(host_.data_ptr()) && aligned16(device_.data_ptr()),
                          "work table buffers must be 16-byte aligned");
    entries_ = fill_table<Entry>(host_.data_ptr<uint8_t>(), layout_, module_ids, numels);
  }

  // The host entry of tensor i (first_chunk set), for the caller to fill in before upload().
  Entry& entry(size_t i) { return entries_[i]; }

  // Enqueues the copy to the device on the current stream; returns the table's device addresses.
  ChunkTable<Entry> upload() {
    device_.narrow(0, 0, static_cast<int64_t>(layout_.host_bytes)).copy_(host_, /*non_blocking=*/true);
    return device_table<Entry>(device_.data_ptr<uint8_t>(), layout_);
  }

 private:
  TableLayout layout_;
  at::Tensor host_;
  at::Tensor device_;
  Entry* entries_ = nullptr;
};

}  // namespace

std::vector<at::Tensor> grad_sq_norms(const std::vector<at::Tensor>& grads,
                                      const std::vector<int64_t>& module_ids, int64_t num_modules,
                                      std::optional<double> max_norm, const std::optional<at::Tensor>& accum,
                                      const std::optional<at::Tensor>& accum_count,
                                      const std::optional<at::Tensor>& accum_weight, int64_t accum_rule) {
  TORCH_CHECK(accum_rule == 0 || accum_rule == 1,
              "accum_rule must be 0 (\"sq\") or 1 (\"clipped_norm\"), got ", accum_rule);
  TORCH_CHECK(grads.size() == module_ids.size(), "grads has ", grads.size(), " tensors but module_ids has ",
              module_ids.size(), " entries");
  TORCH_CHECK(num_modules >= 0, "num_modules must be non-negative, got ", num_modules);
  TORCH_CHECK(!max_norm.has_value() || (std::isfinite(*max_norm) && *max_norm > 0.0),
              "max_norm must be a positive finite number, got ", *max_norm);
  std::optional<at::Device> device;
  if (!grads.empty()) {
    TORCH_CHECK(grads[0].defined(), "grads[0] is undefined");
    device = grads[0].device();
  } else {
    for (const auto* buffer : {&accum, &accum_count, &accum_weight}) {
      if (!device.has_value() && buffer->has_value() && (*buffer)->defined()) device = (*buffer)->device();
    }
  }
  TORCH_CHECK(device.has_value(),
              "grads is empty and no accum buffer names the device; "
              "call misa_kernels.grad_sq_norms, which handles empty lists");
  TORCH_CHECK(device->is_cuda(), "the cuda backend runs on CUDA tensors, got tensors on ", *device);
  for (size_t i = 0; i < grads.size(); ++i) check_list_tensor(grads[i], "grads", i, *device);
  const FloatKind grad_kind = uniform_float_kind(grads, "grads");
  check_module_ids(module_ids, num_modules, "num_modules");
  check_float_buffer(accum, "accum", *device, num_modules);
  check_float_buffer(accum_count, "accum_count", *device, num_modules);
  check_float_buffer(accum_weight, "accum_weight", *device, num_modules);

  const c10::cuda::CUDAGuard guard(*device);
  std::vector<int64_t> numels(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) numels[i] = grads[i].numel();
  WorkTable<NormTensor> table(module_ids, numels, num_modules, *device);
  for (size_t i = 0; i < grads.size(); ++i) {
    NormTensor& entry = table.entry(i);
    entry.grad = grads[i].const_data_ptr();
    entry.numel = numels[i];
    entry.vectorized = aligned16(entry.grad) ? 1 : 0;
  }
  const auto options = at::TensorOptions().dtype(at::kFloat).device(*device);
  at::Tensor module_sq_norms = at::empty({num_modules}, options);
  at::Tensor total_norm = at::empty({}, options);
  at::Tensor clip_coef = at::empty({}, options);
  at::Tensor found_inf = at::empty({}, options);

  GradSqNormsArgs args{};
  args.table = table.upload();
  args.module_sq_norms = module_sq_norms.data_ptr<float>();
  args.total_norm = total_norm.data_ptr<float>();
  args.clip_coef = clip_coef.data_ptr<float>();
  args.found_inf = found_inf.data_ptr<float>();
  args.has_max_norm = max_norm.has_value();
  args.max_norm = max_norm.has_value() ? static_cast<float>(*max_norm) : 0.0f;
  args.accum = accum.has_value() ? accum->data_ptr<float>() : nullptr;
  args.accum_count = accum_count.has_value() ? accum_count->data_ptr<float>() : nullptr;
  args.accum_weight = accum_weight.has_value() ? accum_weight->const_data_ptr<float>() : nullptr;
  args.accum_rule = static_cast<int32_t>(accum_rule);
  C10_CUDA_CHECK(launch_grad_sq_norms(args, grad_kind, c10::cuda::getCurrentCUDAStream().stream()));
  return {module_sq_norms, total_norm, clip_coef, found_inf};
}

void adamw_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                 const at::Tensor& steps, const std::vector<int64_t>& module_ids, double lr,
                 const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                 double weight_decay, bool maximize,
                 const std::optional<std::vector<at::Tensor>>& master_params,
                 const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& found_inf,
                 const std::optional<at::Tensor>& sq_norms_out) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  module_ids.size() == n && (!master_params.has_value() || master_params->size() == n),
              "list arguments must have the same length, got params=", n, ", grads=", grads.size(),
              ", exp_avgs=", exp_avgs.size(), ", exp_avg_sqs=", exp_avg_sqs.size(),
              ", module_ids=", module_ids.size(), master_params.has_value() ? ", master_params=" : "",
              master_params.has_value() ? std::to_string(master_params->size()) : "");
  TORCH_CHECK(steps.defined() && steps.is_cuda(), "steps must be a CUDA tensor for the cuda backend");
  const at::Device device = steps.device();
  check_float_buffer(steps, "steps", device, steps.numel());
  const int64_t num_modules = steps.numel();
  check_module_ids(module_ids, num_modules, "steps.numel()");
  for (size_t i = 0; i < n; ++i) {
    check_list_tensor(params[i], "params", i, device);
    check_list_tensor(grads[i], "grads", i, device);
    check_list_tensor(exp_avgs[i], "exp_avgs", i, device, at::kFloat);
    check_list_tensor(exp_avg_sqs[i], "exp_avg_sqs", i, device, at::kFloat);
    const auto shape = params[i].sizes();
    TORCH_CHECK(grads[i].sizes() == shape && exp_avgs[i].sizes() == shape && exp_avg_sqs[i].sizes() == shape,
                "grads, exp_avgs and exp_avg_sqs [", i, "] must have the shape of params[", i, "] ", shape);
    if (master_params.has_value()) {
      check_list_tensor((*master_params)[i], "master_params", i, device, at::kFloat);
      TORCH_CHECK((*master_params)[i].sizes() == shape, "master_params[", i,
                  "] must have the shape of params[", i, "] ", shape);
    }
  }
  const FloatKind param_kind = uniform_float_kind(params, "params");
  const FloatKind grad_kind = uniform_float_kind(grads, "grads");
  double lr_value = lr;
  const float* lr_device = nullptr;
  if (lr_tensor.has_value()) {
    TORCH_CHECK(lr_tensor->defined() && lr_tensor->numel() == 1 && lr_tensor->dim() <= 1,
                "lr_tensor must be a 0-dim tensor");
    TORCH_CHECK_TYPE(lr_tensor->scalar_type() == at::kFloat, "lr_tensor has dtype ", lr_tensor->scalar_type(),
                     "; expected float32");
    if (lr_tensor->is_cpu()) {
      lr_value = lr_tensor->item<float>();  // a host value: read here, no synchronisation
    } else {
      check_float_buffer(lr_tensor, "lr_tensor", device, -1);
      lr_device = lr_tensor->const_data_ptr<float>();
    }
  }
  check_float_buffer(clip_coef, "clip_coef", device, -1);
  check_float_buffer(found_inf, "found_inf", device, -1);
  check_float_buffer(sq_norms_out, "sq_norms_out", device, num_modules);

  const c10::cuda::CUDAGuard guard(device);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) numels[i] = params[i].numel();
  WorkTable<AdamWTensor> table(module_ids, numels, num_modules, device);
  for (size_t i = 0; i < n; ++i) {
    AdamWTensor& entry = table.entry(i);
    entry.param = params[i].data_ptr();
    entry.grad = grads[i].const_data_ptr();
    entry.exp_avg = exp_avgs[i].data_ptr<float>();
    entry.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    entry.master = master_params.has_value() ? (*master_params)[i].data_ptr<float>() : nullptr;
    entry.numel = numels[i];
    entry.module = static_cast<int32_t>(module_ids[i]);
    entry.vectorized = aligned16(entry.param) && aligned16(entry.grad) && aligned16(entry.exp_avg) &&
                       aligned16(entry.exp_avg_sq) && aligned16(entry.master);
  }

  AdamWArgs args{};
  args.table = table.upload();
  args.steps = steps.data_ptr<float>();
  args.lr = lr_value;
  args.lr_device = lr_device;
  args.hyper = AdamWHyper{beta1, beta2, eps, weight_decay, maximize};
  args.clip_coef = clip_coef.has_value() ? clip_coef->const_data_ptr<float>() : nullptr;
  args.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  args.sq_norms_out = sq_norms_out.has_value() ? sq_norms_out->data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(launch_adamw_step(args, param_kind, grad_kind, master_params.has_value(),
                                   c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace misa::cuda
