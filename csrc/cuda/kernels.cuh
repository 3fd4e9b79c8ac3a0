// The torch-free interface between the host glue (ops.cpp) and the CUDA kernels: the work table
// that lives in device memory, the kernel arguments, and one launch function per op. Included by
// both nvcc and the host C++ compiler, so it holds plain data and declarations only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace misa::cuda {

// Elements per chunk, the unit of work of one thread block (PyTorch's multi_tensor_apply uses the
// same): big enough to amortise a block's start-up, small enough that a 202M-element active set
// spreads over ~3000 blocks. A multiple of the 8-element pack, so every chunk of a 16-byte aligned
// tensor starts 16-byte aligned.
constexpr int64_t kChunkSize = 65536;

// Largest number of tensors, chunks and modules in one call. The table stores these indices as
// int32 (half the bytes of int64, and 32-bit index maths in the kernels) and each chunk is one
// block of a 1-D grid, whose x-dimension is limited to 2^31 - 1. Element offsets are int64.
constexpr int64_t kMaxTableIndex = 2147483647;

// Added to the total norm before dividing, as torch.nn.utils.clip_grad_norm_ and torch_ref do
// (in double: the norm is formed in double).
constexpr double kClipEps = 1e-6;

enum class FloatKind : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One gradient of grad_sq_norms.
struct NormTensor {
  const void* grad;
  int64_t numel;
  int32_t first_chunk;  // its chunks are first_chunk, first_chunk + 1, ... (ceil(numel / kChunkSize))
  int32_t vectorized;   // 1 when grad is 16-byte aligned: 16-byte loads, else one element at a time
};

// One parameter of adamw_step_.
struct AdamWTensor {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* master;  // fp32 master weight, or null
  int64_t numel;
  int32_t first_chunk;
  int32_t module;
  int32_t vectorized;  // 1 when every pointer above is 16-byte aligned
};

// Device addresses of a work table. Chunks are numbered module by module (the tensors of a module in
// their order in the call), so the chunks of module m are [module_chunk_begin[m],
// module_chunk_begin[m + 1]) and the last block can sum them in a fixed order. A table is reused by
// every call with the same tensors (ops.cpp keeps it on the device), so launches that share one
// must be ordered (one stream): they share chunk_sums and blocks_done.
template <typename Entry>
struct ChunkTable {
  const Entry* tensors;               // [num_tensors]
  const int32_t* chunk_tensor;        // [num_chunks] tensor of each chunk
  const int32_t* module_chunk_begin;  // [num_modules + 1]
  const int32_t* module_present;      // [num_modules] 1 when some tensor (maybe empty) has that id
  double* chunk_sums;                 // [num_chunks] scratch: sum of squared gradients per chunk
  unsigned int* blocks_done;          // 0 at launch: counts finished blocks; the last one resets it
  int32_t num_chunks;
  int32_t num_modules;
};

struct GradSqNormsArgs {
  ChunkTable<NormTensor> table;
  double* module_sq_norms;  // [num_modules] out
  double* total_norm;       // [] out
  float* clip_coef;         // [] out
  float* found_inf;         // [] out
  bool has_max_norm;
  double max_norm;
  float* accum;               // [num_modules] or null
  float* accum_count;         // [num_modules] or null
  const float* accum_weight;  // [num_modules] or null
  int32_t accum_rule;         // 0: accum += w * s_m; 1: accum += w * sqrt(s_m) * clip_coef
};

struct AdamWHyper {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool maximize;
};

struct AdamWArgs {
  ChunkTable<AdamWTensor> table;
  float* steps;  // [num_modules] completed updates per module
  double lr;     // used when lr_device and lr_device64 are null
  const float* lr_device;     // a float32 lr tensor on the device, or null
  const double* lr_device64;  // a float64 lr tensor on the device, or null
  AdamWHyper hyper;
  const float* clip_coef;  // [] or null
  const float* found_inf;  // [] or null: non-zero skips the step
  double* sq_norms_out;    // [num_modules] or null
};

// Each enqueues one kernel on `stream` and returns cudaGetLastError() (cudaErrorInvalidValue for
// a dtype combination that has no kernel).
cudaError_t launch_grad_sq_norms(const GradSqNormsArgs& args, FloatKind grad_kind, cudaStream_t stream);
cudaError_t launch_adamw_step(const AdamWArgs& args, FloatKind param_kind, FloatKind grad_kind,
                              bool has_master, cudaStream_t stream);

}  // namespace misa::cuda
