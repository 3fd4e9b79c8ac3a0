// adamw_step_ in one launch: block b updates chunk b in fp32 registers, reading lr, clip_coef and
// found_inf from device memory (no host synchronisation); the block that finishes last advances the
// step counter of every module present and, when asked, sums the per-chunk squared gradients per
// module in double (semantics: misa_kernels/backends/torch_ref.py). Learned from PyTorch's fused AdamW
// (multi_tensor_apply, fused_adam_utils.cuh); written anew around a device-memory work table.
#include "adamw_math.cuh"
#include "device_utils.cuh"
#include "kernels.cuh"

namespace misa::cuda {
namespace {

constexpr int kAdamThreads = 512;

// AdamW over elements [start, start + n) of one tensor; returns this thread's share of the sum of
// squared raw gradients over them.
template <typename ParamT, typename GradT, bool kMaster>
__device__ float adamw_chunk(const AdamWTensor& tensor, int64_t start, int n, const AdamWScalars& s) {
  ParamT* param = assume_global(static_cast<ParamT*>(tensor.param)) + start;
  const GradT* grad = assume_global(static_cast<const GradT*>(tensor.grad)) + start;
  float* exp_avg = assume_global(tensor.exp_avg) + start;
  float* exp_avg_sq = assume_global(tensor.exp_avg_sq) + start;
  float* master = nullptr;
  if constexpr (kMaster) master = assume_global(tensor.master) + start;
  float grad_sq = 0.0f;
  int scalar_begin = 0;
  if (tensor.vectorized) {
    const int packs = n / kPackSize;
    for (int p = threadIdx.x; p < packs; p += kAdamThreads) {
      const int offset = p * kPackSize;
      float w[kPackSize], g[kPackSize], m[kPackSize], v[kPackSize];
      if constexpr (kMaster) {
        load_pack(master + offset, w);
      } else {
        load_pack(param + offset, w);
      }
      load_pack(grad + offset, g);
      load_pack(exp_avg + offset, m);
      load_pack(exp_avg_sq + offset, v);
      grad_sq += pack_sum_of_squares(g);  // float32: chunk_sum_of_squares redoes an overflow in double
#pragma unroll
      for (int k = 0; k < kPackSize; ++k) adamw_update(w[k], m[k], v[k], g[k], s);
      store_pack(exp_avg + offset, m);
      store_pack(exp_avg_sq + offset, v);
      if constexpr (kMaster) store_pack(master + offset, w);
      store_pack(param + offset, w);
    }
    scalar_begin = packs * kPackSize;
  }
  for (int i = scalar_begin + threadIdx.x; i < n; i += kAdamThreads) {
    float w;
    if constexpr (kMaster) {
      w = master[i];
    } else {
      w = to_float(param[i]);
    }
    const float g = to_float(grad[i]);
    float m = exp_avg[i];
    float v = exp_avg_sq[i];
    grad_sq = __fmaf_rn(g, g, grad_sq);
    adamw_update(w, m, v, g, s);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if constexpr (kMaster) master[i] = w;
    param[i] = from_float<ParamT>(w);
  }
  return grad_sq;
}

template <typename ParamT, typename GradT, bool kMaster>
__global__ void __launch_bounds__(kAdamThreads) adamw_step_kernel(const __grid_constant__ AdamWArgs args) {
  __shared__ AdamWScalars block_scalars;
  __shared__ bool skip;
  const ChunkTable<AdamWTensor>& table = args.table;
  const int64_t chunk = blockIdx.x;
  const bool has_chunk = chunk < table.num_chunks;
  // Thread 0 reads the device values once for the block. It reads its module's step count before
  // its ticket (finished_last), and the last block advances the counts only after every ticket.
  if (threadIdx.x == 0) {
    skip = args.found_inf != nullptr && *args.found_inf != 0.0f;
    if (has_chunk && !skip) {
      const int32_t module = table.tensors[table.chunk_tensor[chunk]].module;
      const double lr = args.lr_device64 != nullptr ? *args.lr_device64
                        : args.lr_device != nullptr  ? static_cast<double>(*args.lr_device)
                                                     : args.lr;
      const float clip = args.clip_coef != nullptr ? *args.clip_coef : 1.0f;
      block_scalars = adamw_scalars(args.hyper, lr, static_cast<double>(args.steps[module]) + 1.0, clip);
    }
  }
  __syncthreads();
  const bool want_sq = args.sq_norms_out != nullptr;
  if (has_chunk) {
    const AdamWTensor tensor = table.tensors[table.chunk_tensor[chunk]];
    const int64_t start = (chunk - tensor.first_chunk) * kChunkSize;
    const int n = static_cast<int>(min(kChunkSize, tensor.numel - start));
    const GradT* grad = assume_global(static_cast<const GradT*>(tensor.grad)) + start;
    float grad_sq = 0.0f;
    if (!skip) {
      grad_sq = adamw_chunk<ParamT, GradT, kMaster>(tensor, start, n, block_scalars);
    } else if (want_sq) {  // a skipped step writes nothing but still reports the norms
      grad_sq = thread_sum_of_squares<kAdamThreads, float>(grad, n, tensor.vectorized);
    }
    if (want_sq) {  // the gradient is only read, so an overflowed float32 sum can be redone
      const double chunk_sum = chunk_sum_of_squares<kAdamThreads>(grad_sq, grad, n, tensor.vectorized);
      if (threadIdx.x == 0) table.chunk_sums[chunk] = chunk_sum;
    }
  }
  if (!finished_last(table.blocks_done)) return;
  if (!skip) {
    for (int64_t m = threadIdx.x; m < table.num_modules; m += kAdamThreads) {
      if (table.module_present[m]) args.steps[m] += 1.0f;
    }
  }
  if (want_sq) {
    reduce_module_sums<kAdamThreads>(table.module_chunk_begin, table.num_modules, table.chunk_sums,
                                     args.sq_norms_out);
  }
}

template <typename ParamT, typename GradT>
cudaError_t launch(const AdamWArgs& args, bool has_master, cudaStream_t stream) {
  // With no chunk at all (only empty tensors) one block still runs the finishing step.
  const unsigned int blocks = args.table.num_chunks > 0 ? args.table.num_chunks : 1;
  if (has_master) {
    adamw_step_kernel<ParamT, GradT, true><<<blocks, kAdamThreads, 0, stream>>>(args);
  } else {
    adamw_step_kernel<ParamT, GradT, false><<<blocks, kAdamThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <typename ParamT>
cudaError_t launch_for_param(const AdamWArgs& args, FloatKind grad_kind, bool has_master,
                             cudaStream_t stream) {
  switch (grad_kind) {
    case FloatKind::kFloat32:
      return launch<ParamT, float>(args, has_master, stream);
    case FloatKind::kFloat16:
      return launch<ParamT, __half>(args, has_master, stream);
    case FloatKind::kBFloat16:
      return launch<ParamT, __nv_bfloat16>(args, has_master, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_adamw_step(const AdamWArgs& args, FloatKind param_kind, FloatKind grad_kind,
                              bool has_master, cudaStream_t stream) {
  switch (param_kind) {
    case FloatKind::kFloat32:
      return launch_for_param<float>(args, grad_kind, has_master, stream);
    case FloatKind::kFloat16:
      return launch_for_param<__half>(args, grad_kind, has_master, stream);
    case FloatKind::kBFloat16:
      return launch_for_param<__nv_bfloat16>(args, grad_kind, has_master, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace misa::cuda
