// Host-side construction of a work table (ChunkTable in kernels.cuh), torch-free so that its layout
// and chunk numbering can be checked without a GPU. ops.cpp allocates the buffers and keeps each
// table on the device for as long as the same tensors come back.
//
// Byte layout, every section 16-byte aligned, the first five copied from the host:
//   blocks_done (uint32, 0) | tensors (Entry[T]) | chunk_tensor (int32[C])
//   | module_chunk_begin (int32[M + 1]) | module_present (int32[M]) || chunk_sums (double[C], device only)
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include "kernels.cuh"

namespace misa::cuda {

inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

struct TableLayout {
  int64_t num_tensors = 0;
  int64_t num_chunks = 0;
  int64_t num_modules = 0;
  size_t blocks_done = 0;  // byte offsets
  size_t tensors = 0;
  size_t chunk_tensor = 0;
  size_t module_chunk_begin = 0;
  size_t module_present = 0;
  size_t host_bytes = 0;  // bytes built on the host and copied
  size_t chunk_sums = 0;
  size_t device_bytes = 0;
};

// The layout for these tensor sizes. The caller checks the counts against kMaxTableIndex.
template <typename Entry>
TableLayout table_layout(const std::vector<int64_t>& numels, int64_t num_modules) {
  TableLayout layout;
  layout.num_tensors = static_cast<int64_t>(numels.size());
  for (const int64_t numel : numels) layout.num_chunks += chunks_of(numel);
  layout.num_modules = num_modules;
  size_t bytes = 0;
  const auto section = [&bytes](size_t size) {
    const size_t offset = (bytes + 15) / 16 * 16;
    bytes = offset + size;
    return offset;
  };
  layout.blocks_done = section(sizeof(unsigned int));
  layout.tensors = section(layout.num_tensors * sizeof(Entry));
  layout.chunk_tensor = section(layout.num_chunks * sizeof(int32_t));
  layout.module_chunk_begin = section((num_modules + 1) * sizeof(int32_t));
  layout.module_present = section(num_modules * sizeof(int32_t));
  layout.host_bytes = bytes;
  layout.chunk_sums = section(layout.num_chunks * sizeof(double));
  layout.device_bytes = bytes;
  return layout;
}

// Writes the table into `host` (16-byte aligned, layout.host_bytes long): chunks numbered module by
// module, tensors of a module in call order. Returns the entries, zeroed except first_chunk, for
// the caller to fill in. module_ids must lie in [0, num_modules).
template <typename Entry>
Entry* fill_table(uint8_t* host, const TableLayout& layout, const std::vector<int64_t>& module_ids,
                  const std::vector<int64_t>& numels) {
  const int64_t num_modules = layout.num_modules;
  *reinterpret_cast<unsigned int*>(host + layout.blocks_done) = 0;
  Entry* entries = reinterpret_cast<Entry*>(host + layout.tensors);
  std::fill_n(entries, layout.num_tensors, Entry{});
  int32_t* chunk_tensor = reinterpret_cast<int32_t*>(host + layout.chunk_tensor);
  int32_t* chunk_begin = reinterpret_cast<int32_t*>(host + layout.module_chunk_begin);
  int32_t* present = reinterpret_cast<int32_t*>(host + layout.module_present);

  // Tensors grouped by module, in call order within a module (a counting sort).
  std::vector<int64_t> module_start(num_modules + 1, 0);
  for (const int64_t m : module_ids) ++module_start[m + 1];
  std::partial_sum(module_start.begin(), module_start.end(), module_start.begin());
  std::vector<int64_t> next(module_start.begin(), module_start.end() - 1);
  std::vector<int32_t> by_module(layout.num_tensors);
  for (int64_t i = 0; i < layout.num_tensors; ++i) by_module[next[module_ids[i]]++] = static_cast<int32_t>(i);

  int32_t chunk = 0;
  for (int64_t m = 0; m < num_modules; ++m) {
    chunk_begin[m] = chunk;
    present[m] = module_start[m + 1] > module_start[m] ? 1 : 0;
    for (int64_t k = module_start[m]; k < module_start[m + 1]; ++k) {
      const int32_t t = by_module[k];
      entries[t].first_chunk = chunk;
      for (int64_t c = chunks_of(numels[t]); c > 0; --c) chunk_tensor[chunk++] = t;
    }
  }
  chunk_begin[num_modules] = chunk;
  return entries;
}

// The table's addresses once copied to `device` (16-byte aligned, layout.device_bytes long).
template <typename Entry>
ChunkTable<Entry> device_table(uint8_t* device, const TableLayout& layout) {
  ChunkTable<Entry> table{};
  table.tensors = reinterpret_cast<const Entry*>(device + layout.tensors);
  table.chunk_tensor = reinterpret_cast<const int32_t*>(device + layout.chunk_tensor);
  table.module_chunk_begin = reinterpret_cast<const int32_t*>(device + layout.module_chunk_begin);
  table.module_present = reinterpret_cast<const int32_t*>(device + layout.module_present);
  table.chunk_sums = reinterpret_cast<double*>(device + layout.chunk_sums);
  table.blocks_done = reinterpret_cast<unsigned int*>(device + layout.blocks_done);
  table.num_chunks = static_cast<int32_t>(layout.num_chunks);
  table.num_modules = static_cast<int32_t>(layout.num_modules);
  return table;
}

}  // namespace misa::cuda
