// How a multi-tensor step is split into work: (tensor, chunk) items with int64 offsets, shared by
// the CPU kernel (items split between threads) and the CUDA kernel (one block per item, items
// split into launches whose address table fits in the kernel arguments). Plain C++, no ATen.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace classp {

// Elements of one work item at most.
constexpr int64_t kChunkElements = 1 << 16;
// Capacity of one CUDA launch's kernel-argument table: tensors and blocks (= chunks).
constexpr int64_t kLaunchMaxTensors = 48;
constexpr int64_t kLaunchMaxBlocks = 320;

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
// one element), so that threads get equal work. Empty tensors get no chunks.
inline Plan plan_work(const std::vector<int64_t>& numels, int64_t num_parts) {
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
           part_begin(static_cast<int64_t>(plan.part_starts.size())) == done) {
      plan.part_starts.push_back(static_cast<int64_t>(plan.chunks.size()));
    }
  };
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t begin = 0; begin < numels[t];) {
      int64_t end = std::min(numels[t], (begin / kChunkElements + 1) * kChunkElements);
      if (static_cast<int64_t>(plan.part_starts.size()) < num_parts) {
        end = std::min(end, begin + part_begin(static_cast<int64_t>(plan.part_starts.size())) -
                                done);
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

// Splits `chunks` into consecutive CUDA launches of at most kLaunchMaxBlocks chunks from at most
// kLaunchMaxTensors tensors: returns the first chunk of each launch, then chunks.size().
inline std::vector<int64_t> plan_launches(const std::vector<Chunk>& chunks) {
  std::vector<int64_t> starts{0};
  int64_t blocks = 0;
  int64_t tensors = 0;
  int64_t last_tensor = -1;
  for (int64_t i = 0; i < static_cast<int64_t>(chunks.size()); ++i) {
    bool new_tensor = chunks[i].tensor != last_tensor;
    if (blocks == kLaunchMaxBlocks || (new_tensor && tensors == kLaunchMaxTensors)) {
      starts.push_back(i);
      blocks = 0;
      tensors = 0;
      new_tensor = true;
    }
    tensors += new_tensor;
    ++blocks;
    last_tensor = chunks[i].tensor;
  }
  if (!chunks.empty()) {
    starts.push_back(static_cast<int64_t>(chunks.size()));
  }
  return starts;
}

}  // namespace classp
