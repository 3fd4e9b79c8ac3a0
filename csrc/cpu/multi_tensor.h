// Shared pieces of the CPU kernels: the multi-tensor work list, float32/float16/bfloat16 vector
// loads and stores that compute in fp32, the per-chunk sum of squares, and the argument checks.
//
// All tensors of a call are cut into chunks of kChunkElements elements (the last chunk of a
// tensor is shorter) and at::parallel_for hands out whole chunks. A chunk's result depends only
// on its data, and partial sums are combined in chunk order afterwards, so every output is
// bitwise identical whatever the number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

// GCC 12 flags the `__Y = __Y` idiom inside its own AVX-512 intrinsics as uninitialized once
// they are inlined (GCC bug 105593, fixed in GCC 13); the state at the header's lines decides.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop
#include <torch/extension.h>

// at::parallel_for is an inline `#pragma omp parallel` when torch uses OpenMP; compiled without
// -fopenmp it silently runs every kernel on one thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "misa_kernels: compile with -fopenmp (setup.py does), or the CPU kernels run single-threaded"
#endif

namespace misa::cpu {

using FloatVec = at::vec::Vectorized<float>;

// Elements per chunk. 32K float32 are 128 KiB per tensor stream: runs long enough for the
// hardware prefetchers to reach full bandwidth (16K chunks made the norm pass ~20% slower), and
// negligible per-chunk work (one work-list entry, one partial sum, a vector tail); yet a
// 20M-element model still makes ~600 chunks to balance over the threads. A constant, never
// derived from the thread count: see above.
constexpr int64_t kChunkElements = 32768;

// Elements per vector step: two float vectors, which is one full vector of a 16-bit type.
constexpr int64_t kStepElements = 2 * FloatVec::size();
static_assert(kChunkElements % kStepElements == 0, "a full chunk must be whole vector steps");

// A piece of tensor `tensor`: elements [begin, begin + size).
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t size;
};

// The chunks of all tensors of `numels`, tensor by tensor in order; empty tensors have none.
inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t n : numels) total += (n + kChunkElements - 1) / kChunkElements;
  chunks.reserve(total);
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t begin = 0; begin < numels[i]; begin += kChunkElements) {
      chunks.push_back({static_cast<int64_t>(i), begin, std::min(kChunkElements, numels[i] - begin)});
    }
  }
  return chunks;
}

// Loads `count` (at most kStepElements) elements as two float vectors; lanes past `count` are 0.
C10_ALWAYS_INLINE void load_floats(const float* src, int64_t count, FloatVec& lo, FloatVec& hi) {
  constexpr int64_t lanes = FloatVec::size();
  lo = FloatVec::loadu(src, std::min(count, lanes));
  hi = count > lanes ? FloatVec::loadu(src + lanes, count - lanes) : FloatVec(0.f);
}

template <typename T>  // c10::BFloat16 or c10::Half
C10_ALWAYS_INLINE void load_floats(const T* src, int64_t count, FloatVec& lo, FloatVec& hi) {
  std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src, count));
}

// Stores the first `count` (at most kStepElements) lanes of lo, hi; 16-bit types are rounded to
// nearest even.
C10_ALWAYS_INLINE void store_floats(float* dst, int64_t count, const FloatVec& lo, const FloatVec& hi) {
  constexpr int64_t lanes = FloatVec::size();
  lo.store(dst, std::min(count, lanes));
  if (count > lanes) hi.store(dst + lanes, count - lanes);
}

template <typename T>  // c10::BFloat16 or c10::Half
C10_ALWAYS_INLINE void store_floats(T* dst, int64_t count, const FloatVec& lo, const FloatVec& hi) {
  at::vec::convert_from_float<T>(lo, hi).store(dst, count);
}

C10_ALWAYS_INLINE float sum_lanes(const FloatVec& v) {
  return at::vec::vec_reduce_all<float>([](FloatVec& a, FloatVec& b) { return a + b; }, v);
}

// Vector steps whose squares are summed in fp32 before the running total moves to double. Each
// fp32 lane then adds a few dozen values at most, whatever the vector width: with whole 32K
// chunks in fp32, 8-lane builds measured errors up to 4e-6 (relative) on bfloat16 gradients.
constexpr int64_t kBlockSteps = 16;

// Sum of squares of data[0, n). The range is read as kSumStreams equal runs side by side (then a
// short tail), each run with its own accumulator: on a read-only pass several concurrent streams
// per core draw ~25% more memory bandwidth than one (measured on Zen 4), and independent
// accumulators keep the fused multiply-adds from waiting on each other.
constexpr int64_t kSumStreams = 8;
static_assert((kSumStreams & (kSumStreams - 1)) == 0, "the accumulators are added pairwise");

template <typename T>
double sum_of_squares(const T* data, int64_t n) {
  const int64_t run = n / (kSumStreams * kStepElements) * kStepElements;
  double total = 0.0;
  FloatVec acc[kSumStreams];
  FloatVec lo, hi;
  for (int64_t block = 0; block < run; block += kBlockSteps * kStepElements) {
    for (auto& a : acc) a = FloatVec(0.f);
    const int64_t block_end = std::min(run, block + kBlockSteps * kStepElements);
    for (int64_t i = block; i < block_end; i += kStepElements) {
      for (int64_t s = 0; s < kSumStreams; ++s) {
        load_floats(data + s * run + i, kStepElements, lo, hi);
        acc[s] = at::vec::fmadd(hi, hi, at::vec::fmadd(lo, lo, acc[s]));
      }
    }
    for (int64_t width = kSumStreams / 2; width > 0; width /= 2) {
      for (int64_t s = 0; s < width; ++s) acc[s] = acc[s] + acc[s + width];
    }
    total += sum_lanes(acc[0]);
  }
  FloatVec tail(0.f);
  for (int64_t i = kSumStreams * run; i < n; i += kStepElements) {
    load_floats(data + i, std::min(kStepElements, n - i), lo, hi);
    tail = at::vec::fmadd(hi, hi, at::vec::fmadd(lo, lo, tail));
  }
  return total + sum_lanes(tail);
}

// Sum of squares of data[0, n) in double, element by element: exact where the float32 sums of
// sum_of_squares overflow (an element above ~1.8e19 squares to inf in float32). Slow, and only
// run on a chunk whose float32-based sum is not finite, so an inf or NaN element costs one more
// read of its chunk and still gives inf or NaN.
template <typename T>
double sum_of_squares_double(const T* data, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(static_cast<float>(data[i]));
    total += x * x;
  }
  return total;
}

// Sum of squares of data[0, n): the fast float32-block sum, redone in double when it overflowed.
template <typename T>
double overflow_safe_sum_of_squares(const T* data, int64_t n) {
  const double fast = sum_of_squares(data, n);
  return std::isfinite(fast) ? fast : sum_of_squares_double(data, n);
}

// Calls fn(T{}) with T the C++ type of a float32, float16 or bfloat16 dtype.
template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, what, " has dtype ", dtype, "; the cpu backend takes float32, float16, bfloat16");
  }
}

// Sum of squares of every chunk of `tensors` (one float dtype, already checked), in parallel.
inline std::vector<double> chunk_sums_of_squares(const std::vector<at::Tensor>& tensors,
                                                 const std::vector<Chunk>& chunks) {
  std::vector<double> sums(chunks.size());
  if (chunks.empty()) return sums;
  dispatch_float_types(tensors[0].scalar_type(), "grads", [&](auto type_tag) {
    using T = decltype(type_tag);
    std::vector<const T*> data(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) data[i] = tensors[i].const_data_ptr<T>();
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        sums[c] = overflow_safe_sum_of_squares(data[chunks[c].tensor] + chunks[c].begin, chunks[c].size);
      }
    });
  });
  return sums;
}

// Per-module totals of per-chunk partial sums: chunks summed in order into their tensor,
// tensors in order into their module, all in double. Returns one value per module, 0 where no
// tensor belongs.
inline std::vector<double> module_sums(const std::vector<Chunk>& chunks, const std::vector<double>& chunk_sums,
                                       const std::vector<int64_t>& module_ids, int64_t num_modules) {
  std::vector<double> tensor_sums(module_ids.size(), 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) tensor_sums[chunks[c].tensor] += chunk_sums[c];
  std::vector<double> sums(num_modules, 0.0);
  for (size_t i = 0; i < module_ids.size(); ++i) sums[module_ids[i]] += tensor_sums[i];
  return sums;
}

// Checks every element of a tensor list is a contiguous CPU tensor of dtype `dtype` (any float
// type the backend takes when `dtype` is Undefined), with the numel of `numels[i]` when given.
inline void check_tensor_list(const std::vector<at::Tensor>& tensors, const char* name, at::ScalarType dtype,
                              const std::vector<int64_t>* numels = nullptr) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), name, "[", i, "] is undefined");
    TORCH_CHECK(t.device().is_cpu(), name, "[", i, "] is on ", t.device(), "; the cpu backend needs CPU tensors");
    TORCH_CHECK(t.layout() == at::kStrided && t.is_contiguous(), name, "[", i, "] is not a dense contiguous tensor");
    if (dtype == at::ScalarType::Undefined) {
      TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                  name, "[", i, "] has dtype ", t.scalar_type(), "; the cpu backend takes float32, float16, bfloat16");
      TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), name, "[", i, "] has dtype ", t.scalar_type(),
                  " but ", name, "[0] has ", tensors[0].scalar_type(), "; one dtype per list");
    } else {
      TORCH_CHECK(t.scalar_type() == dtype, name, "[", i, "] has dtype ", t.scalar_type(), "; expected ", dtype);
    }
    if (numels != nullptr) {
      TORCH_CHECK(t.numel() == (*numels)[i], name, "[", i, "] has ", t.numel(), " elements but params[", i,
                  "] has ", (*numels)[i]);
    }
  }
}

inline void check_module_ids(const std::vector<int64_t>& module_ids, int64_t num_modules, const char* bound) {
  for (size_t i = 0; i < module_ids.size(); ++i) {
    TORCH_CHECK(module_ids[i] >= 0 && module_ids[i] < num_modules, "module_ids[", i, "] = ", module_ids[i],
                " is outside [0, ", bound, "=", num_modules, ")");
  }
}

// Checks an optional [length] per-module buffer on the CPU of one of `dtypes`.
inline void check_vector(const std::optional<at::Tensor>& t, const char* name, int64_t length,
                         std::initializer_list<at::ScalarType> dtypes) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), name, " is on ", t->device(), "; the cpu backend needs CPU tensors");
  TORCH_CHECK(t->layout() == at::kStrided && t->is_contiguous(), name, " is not a dense contiguous tensor");
  TORCH_CHECK(t->dim() == 1 && t->numel() == length, name, " must have shape (", length, ",), got ", t->sizes());
  TORCH_CHECK(std::find(dtypes.begin(), dtypes.end(), t->scalar_type()) != dtypes.end(), name, " has dtype ",
              t->scalar_type(), "; expected one of ", c10::ArrayRef<at::ScalarType>(dtypes));
}

// Reads a one-element CPU tensor (clip_coef, found_inf: float32; lr: float32 or float64) on the host.
inline double read_scalar(const at::Tensor& t, const char* name, bool allow_double = false) {
  TORCH_CHECK(t.device().is_cpu(), name, " is on ", t.device(), "; the cpu backend needs CPU tensors");
  TORCH_CHECK(t.numel() == 1, name, " must hold one element, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || (allow_double && t.scalar_type() == at::kDouble), name,
              " has dtype ", t.scalar_type(), allow_double ? "; expected float32 or float64" : "; expected float32");
  return t.item<double>();
}

}  // namespace misa::cpu
