// grad_sq_norms in one launch: block b sums the squares of chunk b into a per-chunk partial (float32,
// redone in double when it overflows; see chunk_sum_of_squares); the block that finishes last sums
// the partials per module, then the total, in double and in a fixed order, and
// derives total_norm, clip_coef, found_inf and the importance accumulation (semantics:
// misa_kernels/backends/torch_ref.py). Learned from apex's multi_tensor_l2norm and the CUDA
// samples' threadFenceReduction; written anew around a device-memory work table.
#include "device_utils.cuh"
#include "kernels.cuh"

namespace misa::cuda {
namespace {

constexpr int kNormThreads = 512;

// Last block only: module sums, total, flags, accumulation, all in double as torch_ref forms them;
// clip_coef and found_inf are float32.
__device__ void finish_grad_sq_norms(const GradSqNormsArgs& args) {
  __shared__ bool non_finite;
  __shared__ float clip_coef;
  const ChunkTable<NormTensor>& table = args.table;
  reduce_module_sums<kNormThreads>(table.module_chunk_begin, table.num_modules, table.chunk_sums,
                                   args.module_sq_norms);
  __syncthreads();  // the module sums written above are visible to the whole block
  double partial = 0.0;
  for (int64_t m = threadIdx.x; m < table.num_modules; m += kNormThreads) partial += args.module_sq_norms[m];
  const double total_sq = block_sum<kNormThreads>(partial);
  if (threadIdx.x == 0) {
    non_finite = !isfinite(total_sq);
    const double total_norm = sqrt(total_sq);
    clip_coef = 1.0f;
    if (args.has_max_norm && !non_finite) {
      clip_coef = static_cast<float>(fmin(args.max_norm / (total_norm + kClipEps), 1.0));
    }
    *args.total_norm = total_norm;
    *args.clip_coef = clip_coef;
    *args.found_inf = non_finite ? 1.0f : 0.0f;
  }
  __syncthreads();
  if (non_finite) return;  // a non-finite step accumulates nothing
  for (int64_t m = threadIdx.x; m < table.num_modules; m += kNormThreads) {
    if (!table.module_present[m]) continue;
    if (args.accum != nullptr) {
      // in double, rounded once to the float32 buffer, as torch_ref
      const double sq = args.module_sq_norms[m];
      double value = args.accum_rule == 1 ? sqrt(sq) * static_cast<double>(clip_coef) : sq;
      if (args.accum_weight != nullptr) value *= static_cast<double>(args.accum_weight[m]);
      args.accum[m] = __fadd_rn(args.accum[m], __double2float_rn(value));
    }
    if (args.accum_count != nullptr) args.accum_count[m] += 1.0f;
  }
}

template <typename GradT>
__global__ void __launch_bounds__(kNormThreads)
    grad_sq_norms_kernel(const __grid_constant__ GradSqNormsArgs args) {
  const ChunkTable<NormTensor>& table = args.table;
  const int64_t chunk = blockIdx.x;
  if (chunk < table.num_chunks) {
    const NormTensor tensor = table.tensors[table.chunk_tensor[chunk]];
    const int64_t start = (chunk - tensor.first_chunk) * kChunkSize;
    const int n = static_cast<int>(min(kChunkSize, tensor.numel - start));
    const GradT* grad = assume_global(static_cast<const GradT*>(tensor.grad)) + start;
    const float mine = thread_sum_of_squares<kNormThreads, float>(grad, n, tensor.vectorized);
    const double chunk_sum = chunk_sum_of_squares<kNormThreads>(mine, grad, n, tensor.vectorized);
    if (threadIdx.x == 0) table.chunk_sums[chunk] = chunk_sum;
  }
  if (finished_last(table.blocks_done)) finish_grad_sq_norms(args);
}

template <typename GradT>
cudaError_t launch(const GradSqNormsArgs& args, cudaStream_t stream) {
  // With no chunk at all (only empty tensors) one block still runs the finishing step.
  const unsigned int blocks = args.table.num_chunks > 0 ? args.table.num_chunks : 1;
  grad_sq_norms_kernel<GradT><<<blocks, kNormThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_grad_sq_norms(const GradSqNormsArgs& args, FloatKind grad_kind, cudaStream_t stream) {
  switch (grad_kind) {
    case FloatKind::kFloat32:
      return launch<float>(args, stream);
    case FloatKind::kFloat16:
      return launch<__half>(args, stream);
    case FloatKind::kBFloat16:
      return launch<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace misa::cuda
