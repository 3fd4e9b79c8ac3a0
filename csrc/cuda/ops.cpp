// Host side of the cuda backend (misa::cuda in ops.h): re-checks what the kernels rely on, finds or
// builds the work table of the call's tensors on the device, and launches one kernel per op, all on
// the current stream under a guard for the tensors' device, with no host synchronisation. Only c10
// CUDA headers are used (ATen/cuda/CUDAContext.h needs cuSPARSE headers).
#include "ops.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
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

// Checks an optional buffer of `dtype` on `device`: a vector of `length` elements, or a one-element
// scalar when length is negative.
void check_buffer(const std::optional<at::Tensor>& t, const char* name, const at::Device& device, int64_t length,
                  at::ScalarType dtype = at::kFloat) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->defined(), name, " is undefined");
  TORCH_CHECK(t->layout() == at::kStrided && t->is_contiguous(), name, " must be a dense contiguous tensor");
  TORCH_CHECK(t->device() == device, name, " is on ", t->device(), " but the op runs on ", device);
  TORCH_CHECK_TYPE(t->scalar_type() == dtype, name, " has dtype ", t->scalar_type(), "; expected ", dtype);
  if (length < 0) {
    TORCH_CHECK(t->numel() == 1, name, " must be a one-element tensor, got shape ", t->sizes());
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

// What a work table's bytes depend on: the op, the device, the module ids, the tensors' sizes and
// addresses (the alignment follows from the addresses). Two calls with equal keys can share a table.
using TableKey = std::vector<int64_t>;

struct TableKeyHash {
  size_t operator()(const TableKey& key) const {
    uint64_t hash = 1469598103934665603ull;  // FNV-1a over the 64-bit words
    for (const int64_t word : key) hash = (hash ^ static_cast<uint64_t>(word)) * 1099511628211ull;
    return static_cast<size_t>(hash);
  }
};

// A work table on the device (layout: work_table.cuh).
struct DeviceTable {
  at::Tensor bytes;
  TableLayout layout;
};

// The work tables of recent tensor sets, kept on their devices: a table is built in pinned host
// memory and copied once (one non-blocking copy on the current stream; torch's caching host
// allocator keeps the host block until the copy has run), then every call with the same tensors
// reuses it, copying nothing. The kernels reset the table's ticket counter themselves, so a table
// is ready for the next launch, and for a CUDA graph replay. A table used while the current stream
// is being captured is kept for the life of the process, since a replay may come at any time; one
// that would have to be copied during a capture is refused (the copy would be captured too, and
// replayed from freed host memory). Launches that share a table share its scratch space, so they
// must be ordered: use one tensor set from one stream at a time.
class TableCache {
 public:
  // Tables kept beyond those used by graph captures (an active set of MISA needs one per op and
  // dtype group; a resampling makes new ones).
  static constexpr size_t kCapacity = 32;

  template <typename Build>
  DeviceTable get(const TableKey& key, Build&& build) {
    const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = tables_.find(key);
    if (found == tables_.end()) {
      TORCH_CHECK(!capturing,
                  "misa_kernels (cuda): these tensors have no work table on the device yet, and one cannot be "
                  "copied there during a CUDA graph capture (a replay would read freed host memory). Run the op "
                  "once with the same tensors before capturing (a warm-up call).");
      found = tables_.emplace(key, Entry{build(), 0, false}).first;
      evict_beyond_capacity(found->first);
    }
    found->second.last_use = ++clock_;
    found->second.captured = found->second.captured || capturing;
    return found->second.table;
  }

 private:
  struct Entry {
    DeviceTable table;
    uint64_t last_use;
    bool captured;
  };

  void evict_beyond_capacity(const TableKey& keep) {
    size_t evictable = 0;
    for (const auto& [key, entry] : tables_) evictable += entry.captured ? 0 : 1;
    while (evictable > kCapacity) {
      auto oldest = tables_.end();
      for (auto it = tables_.begin(); it != tables_.end(); ++it) {
        if (!it->second.captured && it->first != keep &&
            (oldest == tables_.end() || it->second.last_use < oldest->second.last_use)) {
          oldest = it;
        }
      }
      tables_.erase(oldest);
      --evictable;
    }
  }

  std::mutex mutex_;
  std::unordered_map<TableKey, Entry, TableKeyHash> tables_;
  uint64_t clock_ = 0;
};

TableCache& table_cache() {
  static TableCache cache;
  return cache;
}

// Builds the table of one call in pinned memory, lets `fill` complete each tensor's entry (first_chunk
// is set), and enqueues the copy to the device on the current stream.
template <typename Entry, typename Fill>
DeviceTable build_table(const std::vector<int64_t>& module_ids, const std::vector<int64_t>& numels,
                        int64_t num_modules, const at::Device& device, Fill&& fill) {
  const TableLayout layout = table_layout<Entry>(numels, num_modules);
  TORCH_CHECK(layout.num_tensors <= kMaxTableIndex, "one call takes at most ", kMaxTableIndex, " tensors, got ",
              layout.num_tensors);
  TORCH_CHECK(num_modules <= kMaxTableIndex, "one call takes at most ", kMaxTableIndex, " modules, got ",
              num_modules);
  TORCH_CHECK(layout.num_chunks <= kMaxTableIndex, "the tensors make ", layout.num_chunks, " chunks of ",
              kChunkSize, " elements; one call takes at most ", kMaxTableIndex);
  at::Tensor host = at::empty({static_cast<int64_t>(layout.host_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  at::Tensor bytes = at::empty({static_cast<int64_t>(layout.device_bytes)},
                               at::TensorOptions().dtype(at::kByte).device(device));
  TORCH_INTERNAL_ASSERT(aligned16(host.data_ptr()) && aligned16(bytes.data_ptr()),
                        "work table buffers must be 16-byte aligned");
  Entry* entries = fill_table<Entry>(host.data_ptr<uint8_t>(), layout, module_ids, numels);
  for (size_t i = 0; i < numels.size(); ++i) fill(i, entries[i]);
  bytes.narrow(0, 0, static_cast<int64_t>(layout.host_bytes)).copy_(host, /*non_blocking=*/true);
  return {bytes, layout};
}

// The start of a table key: op, device, module ids and sizes; the caller appends the addresses.
TableKey key_prefix(int64_t op, const at::Device& device, int64_t num_modules,
                    const std::vector<int64_t>& module_ids, const std::vector<int64_t>& numels) {
  TableKey key;
  key.reserve(4 + module_ids.size() + 6 * numels.size());
  key.insert(key.end(), {op, device.index(), num_modules, static_cast<int64_t>(numels.size())});
  key.insert(key.end(), module_ids.begin(), module_ids.end());
  key.insert(key.end(), numels.begin(), numels.end());
  return key;
}

int64_t address(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

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
  check_buffer(accum, "accum", *device, num_modules);
  check_buffer(accum_count, "accum_count", *device, num_modules);
  check_buffer(accum_weight, "accum_weight", *device, num_modules);

  const c10::cuda::CUDAGuard guard(*device);
  std::vector<int64_t> numels(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) numels[i] = grads[i].numel();
  TableKey key = key_prefix(/*op=*/0, *device, num_modules, module_ids, numels);
  for (const at::Tensor& grad : grads) key.push_back(address(grad.const_data_ptr()));
  const DeviceTable table = table_cache().get(key, [&] {
    return build_table<NormTensor>(module_ids, numels, num_modules, *device, [&](size_t i, NormTensor& entry) {
      entry.grad = grads[i].const_data_ptr();
      entry.numel = numels[i];
      entry.vectorized = aligned16(entry.grad) ? 1 : 0;
    });
  });
  const auto sums = at::TensorOptions().dtype(at::kDouble).device(*device);
  const auto flags = at::TensorOptions().dtype(at::kFloat).device(*device);
  at::Tensor module_sq_norms = at::empty({num_modules}, sums);
  at::Tensor total_norm = at::empty({}, sums);
  at::Tensor clip_coef = at::empty({}, flags);
  at::Tensor found_inf = at::empty({}, flags);

  GradSqNormsArgs args{};
  args.table = device_table<NormTensor>(table.bytes.data_ptr<uint8_t>(), table.layout);
  args.module_sq_norms = module_sq_norms.data_ptr<double>();
  args.total_norm = total_norm.data_ptr<double>();
  args.clip_coef = clip_coef.data_ptr<float>();
  args.found_inf = found_inf.data_ptr<float>();
  args.has_max_norm = max_norm.has_value();
  args.max_norm = max_norm.value_or(0.0);
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
  check_buffer(steps, "steps", device, steps.numel());
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
  const double* lr_device64 = nullptr;
  if (lr_tensor.has_value()) {
    TORCH_CHECK(lr_tensor->defined() && lr_tensor->numel() == 1, "lr_tensor must be a one-element tensor");
    const at::ScalarType lr_dtype = lr_tensor->scalar_type();
    TORCH_CHECK_TYPE(lr_dtype == at::kFloat || lr_dtype == at::kDouble, "lr_tensor has dtype ", lr_dtype,
                     "; expected float32 or float64");
    if (lr_tensor->is_cpu()) {
      lr_value = lr_tensor->item<double>();  // a host value: read here, no synchronisation
    } else {
      check_buffer(lr_tensor, "lr_tensor", device, -1, lr_dtype);
      // read by the kernel in its own dtype: no conversion launch, no rounding of a float64 lr
      if (lr_dtype == at::kFloat) {
        lr_device = lr_tensor->const_data_ptr<float>();
      } else {
        lr_device64 = lr_tensor->const_data_ptr<double>();
      }
    }
  }
  check_buffer(clip_coef, "clip_coef", device, -1);
  check_buffer(found_inf, "found_inf", device, -1);
  check_buffer(sq_norms_out, "sq_norms_out", device, num_modules, at::kDouble);

  const c10::cuda::CUDAGuard guard(device);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) numels[i] = params[i].numel();
  TableKey key = key_prefix(/*op=*/1, device, num_modules, module_ids, numels);
  for (size_t i = 0; i < n; ++i) {
    key.insert(key.end(), {address(params[i].data_ptr()), address(grads[i].const_data_ptr()),
                           address(exp_avgs[i].data_ptr()), address(exp_avg_sqs[i].data_ptr()),
                           master_params.has_value() ? address((*master_params)[i].data_ptr()) : 0});
  }
  const DeviceTable table = table_cache().get(key, [&] {
    return build_table<AdamWTensor>(module_ids, numels, num_modules, device, [&](size_t i, AdamWTensor& entry) {
      entry.param = params[i].data_ptr();
      entry.grad = grads[i].const_data_ptr();
      entry.exp_avg = exp_avgs[i].data_ptr<float>();
      entry.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
      entry.master = master_params.has_value() ? (*master_params)[i].data_ptr<float>() : nullptr;
      entry.numel = numels[i];
      entry.module = static_cast<int32_t>(module_ids[i]);
      entry.vectorized = aligned16(entry.param) && aligned16(entry.grad) && aligned16(entry.exp_avg) &&
                         aligned16(entry.exp_avg_sq) && aligned16(entry.master);
    });
  });

  AdamWArgs args{};
  args.table = device_table<AdamWTensor>(table.bytes.data_ptr<uint8_t>(), table.layout);
  args.steps = steps.data_ptr<float>();
  args.lr = lr_value;
  args.lr_device = lr_device;
  args.lr_device64 = lr_device64;
  args.hyper = AdamWHyper{beta1, beta2, eps, weight_decay, maximize};
  args.clip_coef = clip_coef.has_value() ? clip_coef->const_data_ptr<float>() : nullptr;
  args.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  args.sq_norms_out = sq_norms_out.has_value() ? sq_norms_out->data_ptr<double>() : nullptr;
  C10_CUDA_CHECK(launch_adamw_step(args, param_kind, grad_kind, master_params.has_value(),
                                   c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace misa::cuda
