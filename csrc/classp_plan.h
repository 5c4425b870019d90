// How a multi-tensor step is split into work: (tensor, chunk) items with int64 offsets, shared by
// the CPU kernel (items split between threads) and the CUDA kernel (persistent blocks striding
// over the items of a work table in device memory). Plain C++, no ATen.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace classp {

// Elements of one work item at most.
constexpr int64_t kChunkElements = 1 << 16;

// A run of consecutive elements of one tensor, within one kChunkElements-aligned block of it.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Work split into chunks, and the chunks into parts for threads.
struct Plan {
  std::vector<Chunk> chunks;
  std::vector<int64_t> part_starts;  // first chunk of each part, then chunks.size()
};

// Splits every tensor, in order, into chunks at multiples of kChunkElements, and also where the
// concatenation of all tensors divides into `num_parts` parts of equal element counts (up to
// one element), so that threads get equal work; with `alignments` (one per tensor, dividing
// kChunkElements) a tensor is cut there only at multiples of its alignment, the next multiple
// (a part then starts late). Empty tensors get no chunks.
inline Plan plan_work(const std::vector<int64_t>& numels, int64_t num_parts,
                      const std::vector<int64_t>& alignments = {}) {
  int64_t total = 0;
  for (int64_t numel : numels) {
    total += numel;
  }
  // Elements before part k: the first total % num_parts parts are one element larger.
  const auto part_begin = [&](int64_t k) {
    return total / num_parts * k + std::min(k, total % num_parts);
  };
  Plan plan;
  plan.chunks.reserve(total / kChunkElements + numels.size() + num_parts);
  plan.part_starts.push_back(0);
  int64_t done = 0;
  const auto start_parts_at_done = [&]() {
    while (static_cast<int64_t>(plan.part_starts.size()) < num_parts &&
           part_begin(static_cast<int64_t>(plan.part_starts.size())) <= done) {
      plan.part_starts.push_back(static_cast<int64_t>(plan.chunks.size()));
    }
  };
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t begin = 0; begin < numels[t];) {
      int64_t end = std::min(numels[t], (begin / kChunkElements + 1) * kChunkElements);
      if (static_cast<int64_t>(plan.part_starts.size()) < num_parts) {
        const int64_t align = alignments.empty() ? 1 : alignments[t];
        const int64_t cut =
            begin + part_begin(static_cast<int64_t>(plan.part_starts.size())) - done;
        end = std::min(end, (cut + align - 1) / align * align);
      }
      plan.chunks.push_back({t, begin, end});
      done += end - begin;
      begin = end;
      start_parts_at_done();
    }
  }
  plan.part_starts.resize(num_parts + 1, static_cast<int64_t>(plan.chunks.size()));
  return plan;
}

// The CUDA kernel's work table, one int64 array in device memory: a record of kRecordColumns
// values per tensor, then one entry per chunk of kChunkElements elements, tensor by tensor:
// (record slot << 32) | chunk index within the tensor.
constexpr int64_t kRecordColumns = 10;
struct TensorRecord {
  int64_t param, grad, acc;  // device addresses
  int64_t numel;             // > 0
  int64_t row;               // row of the tensor in the counts output
  int64_t weight, anchor;    // device addresses of importance and anchor; 0 without a penalty
  int64_t scales;            // device address of the block scales of 8-bit codes, else 0
  int64_t first_index;       // index of the first element in its parameter (compressed accs)
  int64_t weight_scales;     // device address of the block scales of 8-bit importances, else 0
};

inline std::vector<int64_t> work_table(const std::vector<TensorRecord>& records) {
  std::vector<int64_t> table;
  int64_t chunks = 0;
  for (const TensorRecord& r : records) {
    chunks += (r.numel + kChunkElements - 1) / kChunkElements;
  }
  table.reserve(records.size() * kRecordColumns + chunks);
  for (const TensorRecord& r : records) {
    table.insert(table.end(), {r.param, r.grad, r.acc, r.numel, r.row, r.weight, r.anchor,
                               r.scales, r.first_index, r.weight_scales});
  }
  for (int64_t slot = 0; slot < static_cast<int64_t>(records.size()); ++slot) {
    for (int64_t chunk = 0; chunk * kChunkElements < records[slot].numel; ++chunk) {
      table.push_back(slot << 32 | chunk);
    }
  }
  return table;
}

}  // namespace classp
