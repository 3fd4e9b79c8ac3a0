// Device helpers shared by the kernels: 8-element packs moved with 16-byte accesses, fixed-order
// (deterministic) sums, overflow-safe chunk sums of squares, and the "last block" ticket that lets
// one launch finish its own reduction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"

namespace misa::cuda {

constexpr int kWarpSize = 32;
// Elements one thread moves per step: one 16-byte vector of a 16-bit array, two of a float array.
constexpr int kPackSize = 8;
static_assert(kChunkSize % kPackSize == 0, "a chunk must hold whole packs");
static_assert(kPackSize == 8, "load_pack and store_pack move two float4 or one uint4 of 16-bit values");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Rounds to nearest even, as Tensor.to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Tells the compiler that p, read from the work table, addresses global memory, so that it emits
// ld.global / st.global rather than generic accesses.
template <typename T>
__device__ __forceinline__ T* assume_global(T* p) {
  __builtin_assume(__isGlobal(p));
  return p;
}

// 16-bit floats as raw bits, so that a pack moves as one uint4 (element 2j in the low half of
// word j: little-endian, as in memory).
__device__ __forceinline__ unsigned short to_bits(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ unsigned short to_bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
template <typename T>
__device__ __forceinline__ T from_bits(unsigned short bits);
template <>
__device__ __forceinline__ __half from_bits<__half>(unsigned short bits) {
  return __ushort_as_half(bits);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(unsigned short bits) {
  return __ushort_as_bfloat16(bits);
}

// Loads src[0..kPackSize) as floats with 16-byte loads; src must be 16-byte aligned.
__device__ __forceinline__ void load_pack(const float* src, float (&dst)[kPackSize]) {
  const float4 lo = reinterpret_cast<const float4*>(src)[0];
  const float4 hi = reinterpret_cast<const float4*>(src)[1];
  const float values[kPackSize] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
  for (int k = 0; k < kPackSize; ++k) dst[k] = values[k];
}
template <typename Half>
__device__ __forceinline__ void load_pack(const Half* src, float (&dst)[kPackSize]) {
  static_assert(sizeof(Half) == 2, "16-bit floats only");
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    dst[2 * j] = to_float(from_bits<Half>(static_cast<unsigned short>(words[j] & 0xffffu)));
    dst[2 * j + 1] = to_float(from_bits<Half>(static_cast<unsigned short>(words[j] >> 16)));
  }
}

// Stores src, rounded to the element type, at dst[0..kPackSize) with 16-byte stores; dst must be
// 16-byte aligned.
__device__ __forceinline__ void store_pack(float* dst, const float (&src)[kPackSize]) {
  __stwb(reinterpret_cast<float4*>(dst), make_float4(src[0], src[1], src[2], src[3]));
  __stwb(reinterpret_cast<float4*>(dst) + 1, make_float4(src[4], src[5], src[6], src[7]));
}
template <typename Half>
__device__ __forceinline__ void store_pack(Half* dst, const float (&src)[kPackSize]) {
  static_assert(sizeof(Half) == 2, "16-bit floats only");
  unsigned int words[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    words[j] = static_cast<unsigned int>(to_bits(from_float<Half>(src[2 * j]))) |
               (static_cast<unsigned int>(to_bits(from_float<Half>(src[2 * j + 1]))) << 16);
  }
  __stwb(reinterpret_cast<uint4*>(dst), make_uint4(words[0], words[1], words[2], words[3]));
}

// Sum of squares of a pack, pairwise.
__device__ __forceinline__ float pack_sum_of_squares(const float (&x)[kPackSize]) {
  float s[kPackSize / 2];
#pragma unroll
  for (int k = 0; k < kPackSize / 2; ++k) s[k] = __fmaf_rn(x[2 * k], x[2 * k], x[2 * k + 1] * x[2 * k + 1]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Packs a thread loads before using any, in thread_sum_of_squares: four 16-byte loads in flight.
constexpr int kSumUnroll = 4;

// This thread's share of sum(x[i]^2) over x[0..n) in a kThreads-thread block, accumulated in Acc
// (float: the fast pass; double: the redo of a chunk whose float sum overflowed). Vectorised
// tensors go pack by pack into kPackSize accumulators (each adds a handful of terms per chunk),
// then the tail of fewer than kPackSize elements; unaligned tensors go element by element.
template <int kThreads, typename Acc, typename T>
__device__ Acc thread_sum_of_squares(const T* x, int n, bool vectorized) {
  Acc acc[kPackSize] = {};
  int scalar_begin = 0;
  if (vectorized) {
    const int packs = n / kPackSize;
    for (int p = threadIdx.x; p < packs; p += kSumUnroll * kThreads) {
      float v[kSumUnroll][kPackSize];
#pragma unroll
      for (int u = 0; u < kSumUnroll; ++u) {
        const int pack = p + u * kThreads;
        if (pack < packs) {
          load_pack(x + pack * kPackSize, v[u]);
        } else {
#pragma unroll
          for (int k = 0; k < kPackSize; ++k) v[u][k] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kSumUnroll; ++u) {
#pragma unroll
        for (int k = 0; k < kPackSize; ++k) acc[k] = fma(Acc(v[u][k]), Acc(v[u][k]), acc[k]);
      }
    }
    scalar_begin = packs * kPackSize;
  }
  for (int i = scalar_begin + threadIdx.x; i < n; i += kThreads) {
    const Acc v = to_float(x[i]);
    acc[0] = fma(v, v, acc[0]);
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Butterfly sum over the warp: every lane gets the same value, added in the same order every run.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum of one value per thread of a kThreads-thread block, in a fixed order, returned to every
// thread. Every thread must call it.
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T x) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= kWarpSize * kWarpSize, "one warp sums the warps");
  __shared__ T warp_sums[kThreads / kWarpSize];
  __shared__ T total;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  x = warp_sum(x);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const T sum = warp_sum(lane < kThreads / kWarpSize ? warp_sums[lane] : T(0));
    if (lane == 0) total = sum;
  }
  __syncthreads();
  const T result = total;
  __syncthreads();  // warp_sums and total are free again when this returns
  return result;
}

// The sum of squares of x[0..n), one chunk of a kThreads-thread block, in double, returned to
// every thread: `fast` is this thread's float32 share (thread_sum_of_squares<kThreads, float>,
// or fused into an update loop). A float32 sum that is not finite (an element above ~1.8e19
// squares to inf) is redone in double, so a finite gradient always has a finite sum, while an
// inf or NaN element keeps it inf or NaN; x is only read. Every thread must call it.
template <int kThreads, typename T>
__device__ double chunk_sum_of_squares(float fast, const T* x, int n, bool vectorized) {
  const float sum = block_sum<kThreads>(fast);
  if (isfinite(sum)) return sum;  // uniform across the block: every thread has the same sum
  return block_sum<kThreads>(thread_sum_of_squares<kThreads, double>(x, n, vectorized));
}

// Every thread of every block calls this once, after its chunk's work. Returns true in all threads
// of the block that finishes last; that block then sees everything the other blocks' thread 0 wrote
// or read before their call (chunk sums written, step counters read). The counter lives in the
// table, which later calls (and CUDA graph replays) reuse: it is 0 when the table is first copied
// to the device, and the last block sets it back to 0 (no other block touches it any more).
__device__ __forceinline__ bool finished_last(unsigned int* blocks_done) {
  __shared__ bool is_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // release: this block's chunk sum is visible before its ticket is
    is_last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
    if (is_last) *blocks_done = 0;  // ready for the next launch, which the stream orders after this one
  }
  __syncthreads();
  if (is_last) __threadfence();  // acquire: read other blocks' writes only after all tickets
  return is_last;
}

// Last block only: out[m] = sum of chunk_sums over the chunks of module m, for every module (0 for
// one without chunks). A warp takes whole modules; its lanes add chunks strided by 32, then across
// the warp. The order depends on the table alone, so the sums are bitwise reproducible. Chunk sums
// are read with ld.global.cg (L2, not the non-coherent L1): other blocks wrote them.
template <int kThreads>
__device__ __forceinline__ void reduce_module_sums(const int32_t* module_chunk_begin, int32_t num_modules,
                                                   const double* chunk_sums, double* out) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t m = warp; m < num_modules; m += kThreads / kWarpSize) {
    const int64_t end = module_chunk_begin[m + 1];
    double sum = 0.0;
#pragma unroll 4
    for (int64_t c = static_cast<int64_t>(module_chunk_begin[m]) + lane; c < end; c += kWarpSize)
      sum += __ldcg(chunk_sums + c);
    sum = warp_sum(sum);
    if (lane == 0) out[m] = sum;
  }
}

}  // namespace misa::cuda
