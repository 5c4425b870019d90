// The classp_fused op library: the schema of classp_fused::classp_step_ and its CPU kernel
// (classp_module.cpp makes the Python module classp_fused._C; importing it registers the ops).
//
// CPU kernel: one at::parallel_for region over all (tensor, chunk) pairs, split between threads
// by element count; at::vec arithmetic in fp32 (fp64 for fp64 params), the parameter rounded
// once on write. The write traffic follows the update density, without a branch on whether a
// block (one native vector of params) has a selected element: one with none sends its stores
// to a scratch block of the thread's, picked by a conditional move, so its cache lines stay
// clean; one with some is written whole, its unselected elements with their old bits (a
// bitwise blend); one with all, without the blend (a branch, predictable: a step selects nearly
// all elements, at threshold 0, or few). A branch on "any selected" is mispredicted on many
// blocks at the densities CLASSP runs at (a step selecting 10% at random took 2.1-2.6x the dense
// step's time), and AVX2 masked stores (vmaskmovps), which would skip unselected elements one
// by one, made the step 2.5x slower at every density on the AMD Zen 3 it was measured on. A
// penalty (SPEC section 4a) reads the importance and anchor of the tensors it covers in the
// same pass: explicit, its gradient joins the unscaled gradient before the threshold; proximal,
// the new value of each updated element is pulled toward its anchor before it is written. The
// importance is read in its stored format, a template parameter of the loop (the param's
// dtype, bfloat16, or 8-bit codes with block scales), as its exact float32 value
// (state_formats.importance_values); threads split tensors with 8-bit importances at blocks. A
// relative threshold tau > 0 raises a tensor's threshold to tau * S, S its gradient mean of the
// previous step; given means are refreshed from per-chunk sums of the squared finite gradients,
// added up per tensor after the parallel region. Compressed accumulators (bf16 or 8-bit codes
// with per-block scales; classp_fused/state_formats.py, classp_state_formats.h) are stepped
// in groups decoded to a float32 buffer; a group with a selected element is rounded back with
// its counter-based random bits (bf16: the cache line; 8-bit: the whole block, with a new
// scale), others are not written. Threads split 8-bit tensors only at block boundaries.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "classp_checks.h"
#include "classp_penalty.h"
#include "classp_plan.h"
#include "classp_state_formats.h"
#include "classp_vec_blocks.h"
#include "classp_vec_formats.h"

namespace classp {
namespace {

using at::vec::Vectorized;

// Below this many elements per thread, fewer threads are used.
constexpr int64_t kMinElementsPerThread = 1 << 15;
// Software prefetch distance: with the mask and count work per element, the out-of-order window
// alone keeps too few cache misses in flight (measured 20% slower than fused Adagrad without).
constexpr int64_t kPrefetchElements = 1024;

enum class Power { kOne, kTwo, kGeneric };

// The step's scalars in the arithmetic type, rounded as the reference rounds them.
// `factor` is the penalty's 2 * scale; `cap` bounds its proximal coefficient c. `threshold` is
// set per tensor (see tensor_threshold); `sum_squares` asks for the gradient means' sums.
template <typename T>
struct Hyper {
  T lr, threshold, eps, power, inv_power, grad_scale, factor, cap;
  bool apply_scaling, has_grad_scale, sum_squares;
};

template <typename T>
Hyper<T> make_hyper(double lr, double threshold, double eps, double power, bool apply_scaling,
                    std::optional<double> grad_scale, double penalty_scale, bool sum_squares) {
  return {static_cast<T>(lr),
          static_cast<T>(threshold),
          static_cast<T>(eps),
          static_cast<T>(power),
          static_cast<T>(1.0 / power),
          static_cast<T>(grad_scale.value_or(1.0)),
          static_cast<T>(2.0 * penalty_scale),
          std::numeric_limits<T>::max() / 2,
          apply_scaling,
          grad_scale.has_value(),
          sum_squares};
}

// Element counts of one work item, and the sum of its finite squared gradients (when asked).
struct Tally {
  int64_t updated = 0;
  int64_t nonfinite = 0;
  double square_sum = 0.0;
};

// The gradient as the update sees it: divided by grad_scale when there is one.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> scaled(const Vectorized<T>& grad, const Hyper<T>& h) {
  return h.has_grad_scale ? grad / Vectorized<T>(h.grad_scale) : grad;
}

// The CLASSP update of one vector: new values, and `selected` as a lane mask (all bits set or
// clear). `probe` accumulates grad - grad: zero while every gradient is finite, NaN after any
// that is not (counted afterwards, in the rare ranges that have one); with the explicit
// penalty the non-finite lanes of the penalized gradient are counted into `nonfinite` instead.
// `weight` and `anchor` (importance and anchor) are read only with a penalty. With
// `h.sum_squares` the finite lanes' g*g are added to `squares`.
template <Power kPower, PenaltyForm kForm, typename T>
C10_ALWAYS_INLINE void update_vector(const Vectorized<T>& param, const Vectorized<T>& raw_grad,
                                     const Vectorized<T>& acc, const Vectorized<T>& weight,
                                     const Vectorized<T>& anchor, const Hyper<T>& h,
                                     Vectorized<T>& new_param, Vectorized<T>& new_acc,
                                     Vectorized<T>& selected, Vectorized<T>& probe,
                                     Vectorized<T>& squares, int& nonfinite) {
  using Vec = Vectorized<T>;
  Vec grad = scaled(raw_grad, h);
  if constexpr (kForm == PenaltyForm::kExplicit) {
    grad = grad + Vec(h.factor) * (weight * (param - anchor));
  }
  const Vec square = grad * grad;
  const Vec nan_unless_finite = grad - grad;
  if constexpr (kForm == PenaltyForm::kExplicit) {
    nonfinite += __builtin_popcount((nan_unless_finite == Vec(T(0))).zero_mask());
  } else {
    probe = probe + nan_unless_finite;
  }
  if (h.sum_squares) {
    squares = squares + Vec::blendv(Vec(T(0)), square, nan_unless_finite == Vec(T(0)));
  }
  // isfinite(g) && g*g > threshold: a NaN sum compares false.
  selected = (square + nan_unless_finite) > Vec(h.threshold);
  if constexpr (kPower == Power::kOne) {
    new_acc = acc + grad.abs();
  } else if constexpr (kPower == Power::kTwo) {
    new_acc = acc + square;
  } else {
    new_acc = acc + (Vec(h.power) * grad.abs().log2()).exp2();
  }
  Vec step = grad;
  Vec eta(h.lr);  // the step size of each element
  if (h.apply_scaling) {
    const Vec denom = Vec(h.eps) + new_acc;
    if constexpr (kPower == Power::kOne) {
      step = grad / denom;
      if constexpr (kForm == PenaltyForm::kProximal) {
        eta = eta / denom;
      }
    } else if constexpr (kPower == Power::kTwo) {
      const Vec root = denom.rsqrt();
      step = grad * root;
      if constexpr (kForm == PenaltyForm::kProximal) {
        eta = eta * root;
      }
    } else {
      const Vec root = (denom.log2() * Vec(-h.inv_power)).exp2();  // no 1/denom overflow
      step = grad * root;
      if constexpr (kForm == PenaltyForm::kProximal) {
        eta = eta * root;
      }
    }
  }
  new_param = param - Vec(h.lr) * step;
  if constexpr (kForm == PenaltyForm::kProximal) {
    Vec c = Vec(h.factor) * weight * eta;
    c = Vec::blendv(c, Vec(h.cap), c > Vec(h.cap));  // a NaN c stays NaN, as clamp_max keeps it
    new_param = new_param + c / (Vec(T(1)) + c) * (anchor - new_param);
  }
}

template <typename scalar_t>
C10_ALWAYS_INLINE Block<scalar_t> load_block(const scalar_t* ptr) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    static_assert(Vectorized<scalar_t>::size() == kBlock<scalar_t>);
    const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(ptr));
    return {lo, hi};
  } else {
    return {Vectorized<scalar_t>::loadu(ptr)};
  }
}

// Stores a block of new parameter values at `ptr`; with `blend`, where `selected` is clear the
// old bits at `old` stay (also NaN payloads, which a round trip through fp32 would not keep for
// bf16/fp16).
template <typename scalar_t>
C10_ALWAYS_INLINE void store_param_block(scalar_t* ptr, const scalar_t* old,
                                         const Block<scalar_t>& old_value,
                                         const Block<scalar_t>& value,
                                         const Block<scalar_t>& selected, bool blend) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    auto packed = at::vec::convert_from_float<scalar_t>(value[0], value[1]);
    if (blend) {
      const auto mask = at::vec::VecMask<float, 2>(
                            at::vec::VectorizedN<float, 2>(selected[0], selected[1]))
                            .template cast<scalar_t, 1>();
      packed = Vectorized<scalar_t>::blendv(Vectorized<scalar_t>::loadu(old), packed,
                                            Vectorized<scalar_t>(mask));
    }
    packed.store(ptr);
  } else {
    (blend ? Vectorized<scalar_t>::blendv(old_value[0], value[0], selected[0]) : value[0])
        .store(ptr);
  }
}

// The blocks that the stores of unselected blocks go to (see aim_stores).
template <typename scalar_t>
struct Sink {
  alignas(64) scalar_t param[kBlock<scalar_t>];
  alignas(64) math_t<scalar_t> acc[kBlock<scalar_t>];
};

// Points a block's stores, `param` and `acc`, at `sink` if none of its elements is selected
// (`unselected`, a lane mask, equals `all_lanes`); without a branch, which at the densities
// CLASSP runs at would be mispredicted on many blocks.
template <typename scalar_t>
C10_ALWAYS_INLINE void aim_stores(scalar_t*& param, math_t<scalar_t>*& acc,
                                  Sink<scalar_t>& sink, int unselected, int all_lanes) {
#if defined(__x86_64__) && defined(__GNUC__)
  // Conditional moves: compilers make a branch of `none ? sink : ptr`.
  asm("cmp %[all], %[unselected]\n\t"
      "cmove %[sink_param], %[param]\n\t"
      "cmove %[sink_acc], %[acc]"
      : [param] "+r"(param), [acc] "+r"(acc)
      : [unselected] "r"(unselected), [all] "ri"(all_lanes), [sink_param] "rm"(sink.param),
        [sink_acc] "rm"(sink.acc)
      : "cc");
#else
  const uintptr_t keep = -static_cast<uintptr_t>(unselected != all_lanes);  // all bits or none
  const auto aim = [keep](auto* ptr, auto* scratch) {
    return reinterpret_cast<decltype(ptr)>((reinterpret_cast<uintptr_t>(ptr) & keep) |
                                           (reinterpret_cast<uintptr_t>(scratch) & ~keep));
  };
  param = aim(param, sink.param);
  acc = aim(acc, sink.acc);
#endif
}

// One range's memory: param, grad, accumulator, and with a penalty importance and anchor. The
// importance is stored as weight_t: the param's dtype, bfloat16, or uint8 8-bit codes, whose
// scale is weight_scales[(weight_index + j) / kScaleBlock] at element j of the range (the
// tensor's block scales, and the index within it of the range's first element).
template <typename scalar_t, typename weight_t = scalar_t>
struct RangePointers {
  scalar_t* param;
  const scalar_t* grad;
  math_t<scalar_t>* acc;
  const weight_t* weight;
  const scalar_t* anchor;
  const float* weight_scales = nullptr;
  int64_t weight_index = 0;
};

// The importances of the kBlock<scalar_t> elements from element `i`, in the arithmetic type:
// exact, as state_formats.importance_values gives them (a block lies within one 8-bit block).
template <typename scalar_t, typename weight_t>
C10_ALWAYS_INLINE Block<scalar_t> load_weight_block(const RangePointers<scalar_t, weight_t>& ptr,
                                                    int64_t i) {
  if constexpr (std::is_same_v<weight_t, scalar_t>) {
    return load_block(ptr.weight + i);
  } else {
    static_assert(std::is_same_v<math_t<scalar_t>, float>);
    constexpr int64_t kVec = Vectorized<float>::size();
    float scale = 0.0f;
    if constexpr (std::is_same_v<weight_t, uint8_t>) {
      scale = ptr.weight_scales[(ptr.weight_index + i) / kScaleBlock];
    }
    Block<scalar_t> w;
    for (int v = 0; v < kVectors<scalar_t>; ++v) {
      w[v] = load_importance(ptr.weight + i + v * kVec, scale);
    }
    return w;
  }
}

// Updates the kBlock<scalar_t> elements from element `i`; returns how many were selected. A
// block with none selected is not written: its stores go to `sink`.
template <Power kPower, PenaltyForm kForm, typename scalar_t, typename weight_t>
C10_ALWAYS_INLINE int step_block(const RangePointers<scalar_t, weight_t>& ptr, int64_t i,
                                 Sink<scalar_t>& sink, const Hyper<math_t<scalar_t>>& h,
                                 Vectorized<math_t<scalar_t>>& probe,
                                 Vectorized<math_t<scalar_t>>& squares, int64_t& nonfinite) {
  using Vec = Vectorized<math_t<scalar_t>>;
  constexpr int kVec = Vec::size();
  constexpr int kAllLanes = (1 << kVec) - 1;
  scalar_t* const param = ptr.param + i;
  math_t<scalar_t>* const acc = ptr.acc + i;
  const Block<scalar_t> p = load_block(param);
  const Block<scalar_t> g = load_block(ptr.grad + i);
  Block<scalar_t> w{}, m{};
  if constexpr (kForm != PenaltyForm::kNone) {
    w = load_weight_block(ptr, i);
    m = load_block(ptr.anchor + i);
  }
  Block<scalar_t> a, new_p, new_a, selected;
  int unselected = 0;  // count of unselected lanes
  int unselected_everywhere = kAllLanes;  // the lanes unselected in every vector
  bool all_selected = true;
  int block_nonfinite = 0;
  for (int v = 0; v < kVectors<scalar_t>; ++v) {
    a[v] = Vec::loadu(acc + v * kVec);
    update_vector<kPower, kForm>(p[v], g[v], a[v], w[v], m[v], h, new_p[v], new_a[v],
                                 selected[v], probe, squares, block_nonfinite);
    const int unselected_lanes = selected[v].zero_mask();
    unselected_everywhere &= unselected_lanes;
    all_selected &= unselected_lanes == 0;
    unselected += __builtin_popcount(unselected_lanes);
  }
  nonfinite += block_nonfinite;
  if (all_selected) {
    for (int v = 0; v < kVectors<scalar_t>; ++v) {
      new_a[v].store(acc + v * kVec);
    }
    store_param_block(param, param, p, new_p, selected, false);
    return kBlock<scalar_t>;
  }
  scalar_t* param_target = param;
  math_t<scalar_t>* acc_target = acc;
  aim_stores(param_target, acc_target, sink, unselected_everywhere, kAllLanes);
  for (int v = 0; v < kVectors<scalar_t>; ++v) {
    Vec::blendv(a[v], new_a[v], selected[v]).store(acc_target + v * kVec);
  }
  store_param_block(param_target, param, p, new_p, selected, true);
  return kBlock<scalar_t> - unselected;
}

// Prefetches, into L2, every cache line of `count` elements at `ptr`.
template <int kReadWrite, typename T>
C10_ALWAYS_INLINE void prefetch_lines(const T* ptr, int64_t count) {
  constexpr int64_t kLineElements = 64 / sizeof(T);
  for (int64_t k = 0; k < count; k += kLineElements) {
    __builtin_prefetch(ptr + k, kReadWrite, 2);
  }
}

// Blocks per prefetch: those of one cache line of params.
template <typename scalar_t>
constexpr int64_t kBlocksPerLine = std::max<int64_t>(1, 64 / (kBlock<scalar_t> * sizeof(scalar_t)));

// Prefetches the `count` elements kPrefetchElements after element `i`.
template <PenaltyForm kForm, typename scalar_t, typename weight_t>
C10_ALWAYS_INLINE void prefetch_range(const RangePointers<scalar_t, weight_t>& ptr, int64_t i,
                                      int64_t count) {
  const int64_t ahead = i + kPrefetchElements;
  prefetch_lines<1>(ptr.param + ahead, count);
  prefetch_lines<0>(ptr.grad + ahead, count);
  prefetch_lines<1>(ptr.acc + ahead, count);
  if constexpr (kForm != PenaltyForm::kNone) {
    prefetch_lines<0>(ptr.weight + ahead, count);
    prefetch_lines<0>(ptr.anchor + ahead, count);
  }
}

// The number of non-finite gradients in [0, n), after grad_scale.
template <typename scalar_t>
int64_t count_nonfinite(const scalar_t* grad, int64_t n, const Hyper<math_t<scalar_t>>& h) {
  using T = math_t<scalar_t>;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T g = static_cast<T>(grad[i]);
    count += !std::isfinite(h.has_grad_scale ? g / h.grad_scale : g);
  }
  return count;
}

// Completes the tally of elements [0, n) with gradients `grad`: the non-finite gradients
// counted again where `probe` saw one, and the squared gradients' lanes summed.
template <typename scalar_t>
void finish_tally(const Vectorized<math_t<scalar_t>>& probe,
                  const Vectorized<math_t<scalar_t>>& squares, const scalar_t* grad, int64_t n,
                  const Hyper<math_t<scalar_t>>& h, Tally& tally) {
  using T = math_t<scalar_t>;
  if (probe.zero_mask() != (1 << Vectorized<T>::size()) - 1) {
    tally.nonfinite = count_nonfinite(grad, n, h);
  }
  if (h.sum_squares) {
    T lanes[Vectorized<T>::size()];
    squares.store(lanes);
    for (const T lane : lanes) {
      tally.square_sum += lane;
    }
  }
}

// Updates elements [0, n) of one tensor: whole blocks in place, the tail on zero-padded copies
// (a zero gradient, importance and anchor are never selected since threshold >= 0), copied
// back only if selected. `h` is a copy so that stores through `param` and `acc` cannot alias it.
template <Power kPower, PenaltyForm kForm, typename scalar_t, typename weight_t>
Tally step_range(const RangePointers<scalar_t, weight_t>& ptr, int64_t n,
                 const Hyper<math_t<scalar_t>> h) {
  using T = math_t<scalar_t>;
  constexpr int64_t kSize = kBlock<scalar_t>;
  constexpr int64_t kLine = kSize * kBlocksPerLine<scalar_t>;  // elements per prefetch
  Tally tally;
  Vectorized<T> probe(T(0));
  Vectorized<T> squares(T(0));
  Sink<scalar_t> sink;
  int64_t updated = 0;
  int64_t nonfinite = 0;
  int64_t i = 0;
  for (; i + kLine <= n - kPrefetchElements; i += kLine) {
    prefetch_range<kForm>(ptr, i, kLine);
    for (int64_t b = 0; b < kLine; b += kSize) {
      updated += step_block<kPower, kForm>(ptr, i + b, sink, h, probe, squares, nonfinite);
    }
  }
  for (; i + kSize <= n; i += kSize) {
    updated += step_block<kPower, kForm>(ptr, i, sink, h, probe, squares, nonfinite);
  }
  tally.updated = updated;
  tally.nonfinite = nonfinite;
  const int64_t rest = n - i;
  if (rest > 0) {
    scalar_t param_tail[kSize] = {};
    scalar_t grad_tail[kSize] = {};
    T acc_tail[kSize] = {};
    weight_t weight_tail[kSize] = {};
    scalar_t anchor_tail[kSize] = {};
    std::copy_n(ptr.param + i, rest, param_tail);
    std::copy_n(ptr.grad + i, rest, grad_tail);
    std::copy_n(ptr.acc + i, rest, acc_tail);
    if constexpr (kForm != PenaltyForm::kNone) {
      std::copy_n(ptr.weight + i, rest, weight_tail);
      std::copy_n(ptr.anchor + i, rest, anchor_tail);
    }
    const RangePointers<scalar_t, weight_t> tail{param_tail, grad_tail, acc_tail, weight_tail,
                                                 anchor_tail, ptr.weight_scales,
                                                 ptr.weight_index + i};
    const int updated =
        step_block<kPower, kForm>(tail, 0, sink, h, probe, squares, tally.nonfinite);
    if (updated > 0) {
      tally.updated += updated;
      std::copy_n(param_tail, rest, ptr.param + i);
      std::copy_n(acc_tail, rest, ptr.acc + i);
    }
  }
  finish_tally(probe, squares, ptr.grad, n, h, tally);
  return tally;
}

// Compressed accumulators (classp_state_formats.h). A range is stepped in groups of the format's
// size: a group's accumulators are decoded to float32 into a buffer, step_block steps from it
// and leaves there where(selected, new A, old A), and a group with a selected element is
// rounded back whole. Random bits are drawn only for such groups. A format is a struct with the
// element type of its storage, the group size, and the decoding and rounding of a group (at
// `data`, element `i` of its chunk).
enum class AccFormat { kExact, kBf16, k8Bit };

// bfloat16 accumulators, in groups of one cache line. Rounding a whole group keeps the bits of
// its unselected elements: their buffer values are their bfloat16 values widened, whose low 16
// bits are zero, so adding random bits and truncating gives them back.
struct Bf16Acc {
  using Storage = uint16_t;  // bfloat16 bits
  static constexpr int64_t kGroup = 64 / sizeof(Storage);
  uint32_t key;          // rounding key
  uint64_t first_index;  // index of the chunk's first element within its parameter

  C10_ALWAYS_INLINE void decode(const Storage* data, int64_t /*i*/, float* out) const {
    for (int64_t k = 0; k < kGroup; ++k) {
      out[k] = std::bit_cast<float>(static_cast<uint32_t>(data[k]) << 16);
    }
  }

  C10_ALWAYS_INLINE void encode(Storage* data, int64_t i, const float* values) const {
    uint32_t bits[kGroup];
    element_bits(key, first_index + i, kGroup, bits);
    for (int64_t k = 0; k < kGroup; ++k) {
      data[k] = round_bf16(values[k], bits[k]);
    }
  }
};

// 8-bit codes with a scale per kScaleBlock elements; a group is a block (chunks start at
// blocks), encoded again with a new scale from its largest value, new values capped at
// kSaturation (old ones decode to at most that).
struct Block8Acc {
  using Storage = uint8_t;
  static constexpr int64_t kGroup = kScaleBlock;
  uint32_t key;          // rounding key
  uint64_t first_index;  // index of the chunk's first element within its parameter
  float* scales;         // the scales of the chunk's blocks

  using Vec = Vectorized<float>;
  using IVec = Vectorized<int32_t>;

  // q(c) * scale (decode_codes).
  C10_ALWAYS_INLINE void decode(const Storage* data, int64_t i, float* out) const {
    const Vec scale(scales[i / kGroup]);
    for (int64_t k = 0; k < kGroup; k += Vec::size()) {
      decode_codes(data + k, scale).store(out + k);
    }
  }

  // The scale from the values' maximum (values >= 0, capped at kSaturation); each q = x / scale
  // plus 20 random bits below the code's 3 mantissa bits (below 2**-31, q + 2**-31 and 8 codes
  // less), truncated; code 1 at least for x > 0.
  C10_ALWAYS_INLINE void encode(Storage* data, int64_t i, const float* values) const {
    IVec top_bits(0);  // non-negative floats order as their bits, NaN above +inf
    for (int64_t k = 0; k < kGroup; k += Vec::size()) {
      top_bits = at::vec::maximum(top_bits, IVec::loadu(values + k));
    }
    int32_t lanes[IVec::size()];
    top_bits.store(lanes);
    const float top = std::bit_cast<float>(*std::max_element(lanes, lanes + IVec::size()));
    const float scale = block_scale(std::isnan(top) || top < kSaturation ? top : kSaturation);
    uint32_t bits[kGroup];
    element_bits(key, first_index + i, kGroup, bits);
    int32_t codes[kGroup];
    if (scale > 0.0f && scale < 0x1p127f) {  // then every x <= 15/16 * scale
      encode_codes<false>(values, 1.0f / scale, bits, codes);  // x * (1/scale) == x / scale
    } else if (scale > 0.0f) {
      encode_codes<true>(values, scale, bits, codes);
    } else {  // all zero, or a NaN: q = 0
      for (int64_t k = 0; k < kGroup; ++k) {
        codes[k] = values[k] > 0.0f ? 1 : 0;
      }
    }
    for (int64_t k = 0; k < kGroup; ++k) {
      data[k] = static_cast<uint8_t>(codes[k]);
    }
    scales[i / kGroup] = scale;
  }

  // The codes of values x (finite, >= 0) in a block of scale 1 / factor, or of scale `factor`
  // with kCapped (the largest scale: x capped at kSaturation and divided, as 1 / factor would
  // not be a normal number).
  template <bool kCapped>
  C10_ALWAYS_INLINE static void encode_codes(const float* values, float factor,
                                             const uint32_t* bits, int32_t* codes) {
    for (int64_t k = 0; k < kGroup; k += Vec::size()) {
      Vec x = Vec::loadu(values + k);
      if constexpr (kCapped) {
        x = Vec::blendv(x, Vec(kSaturation), x > Vec(kSaturation));
      }
      const Vec q = kCapped ? x / Vec(factor) : x * Vec(factor);
      const Vec low = q < Vec(0x1p-31f);
      const IVec shifted = at::vec::cast<int32_t>(q + (low & Vec(0x1p-31f)));
      // subtracting the bias before the shift: (kCodeBias + 8 * low) << 20
      const IVec bias = IVec::blendv(IVec(kCodeBias << 20), IVec((kCodeBias + 8) << 20),
                                     at::vec::cast<int32_t>(low));
      const IVec code = (shifted + (IVec::loadu(bits + k) & IVec(0xFFFFF)) - bias) >> IVec(20);
      // at least 1 where x > 0 (its bits > 0); x = 0 has code 0
      at::vec::maximum(code, at::vec::minimum(at::vec::cast<int32_t>(x), IVec(1))).store(codes + k);
    }
  }
};

// Steps the group at `data` (element `i` of its chunk), with param, grad, importance and anchor
// at `ptr` (kGroup elements each); returns how many were selected.
template <Power kPower, PenaltyForm kForm, typename Acc, typename scalar_t, typename weight_t>
C10_ALWAYS_INLINE int step_group(const RangePointers<scalar_t, weight_t>& ptr, const Acc& acc,
                                 typename Acc::Storage* data, int64_t i, const Hyper<float>& h,
                                 Vectorized<float>& probe, Vectorized<float>& squares,
                                 int64_t& nonfinite) {
  static_assert(Acc::kGroup % kBlock<scalar_t> == 0);
  alignas(64) float values[Acc::kGroup];
  acc.decode(data, i, values);
  const RangePointers<scalar_t, weight_t> group{ptr.param, ptr.grad, values, ptr.weight,
                                                ptr.anchor, ptr.weight_scales, ptr.weight_index};
  Sink<scalar_t> sink;
  int updated = 0;
  for (int64_t b = 0; b < Acc::kGroup; b += kBlock<scalar_t>) {
    updated += step_block<kPower, kForm>(group, b, sink, h, probe, squares, nonfinite);
  }
  if (updated > 0) {
    acc.encode(data, i, values);
  }
  return updated;
}

// Elements [0, n) of one tensor with a compressed accumulator at `data` (ptr.acc unused): whole
// groups in place, the tail on zero-padded copies (zero values; a zero gradient is never
// selected since threshold >= 0).
template <Power kPower, PenaltyForm kForm, typename Acc, typename scalar_t, typename weight_t>
Tally step_compressed_range(const RangePointers<scalar_t, weight_t>& ptr, const Acc& acc,
                            typename Acc::Storage* data, int64_t n, const Hyper<float> h) {
  constexpr int64_t kGroup = Acc::kGroup;
  constexpr bool kPenalty = kForm != PenaltyForm::kNone;
  Tally tally;
  Vectorized<float> probe(0.0f);
  Vectorized<float> squares(0.0f);
  int64_t i = 0;
  for (; i + kGroup <= n; i += kGroup) {
    if (i + kGroup <= n - kPrefetchElements) {
      const int64_t ahead = i + kPrefetchElements;
      prefetch_lines<1>(ptr.param + ahead, kGroup);
      prefetch_lines<0>(ptr.grad + ahead, kGroup);
      prefetch_lines<1>(data + ahead, kGroup);
      if constexpr (kPenalty) {
        prefetch_lines<0>(ptr.weight + ahead, kGroup);
        prefetch_lines<0>(ptr.anchor + ahead, kGroup);
      }
    }
    const RangePointers<scalar_t, weight_t> group{
        ptr.param + i, ptr.grad + i, nullptr, kPenalty ? ptr.weight + i : nullptr,
        kPenalty ? ptr.anchor + i : nullptr, ptr.weight_scales, ptr.weight_index + i};
    tally.updated += step_group<kPower, kForm>(group, acc, data + i, i, h, probe, squares,
                                               tally.nonfinite);
  }
  const int64_t rest = n - i;
  if (rest > 0) {
    scalar_t param_tail[kGroup] = {};
    scalar_t grad_tail[kGroup] = {};
    weight_t weight_tail[kGroup] = {};
    scalar_t anchor_tail[kGroup] = {};
    typename Acc::Storage data_tail[kGroup] = {};
    std::copy_n(ptr.param + i, rest, param_tail);
    std::copy_n(ptr.grad + i, rest, grad_tail);
    std::copy_n(data + i, rest, data_tail);
    if constexpr (kPenalty) {
      std::copy_n(ptr.weight + i, rest, weight_tail);
      std::copy_n(ptr.anchor + i, rest, anchor_tail);
    }
    const RangePointers<scalar_t, weight_t> tail{param_tail, grad_tail, nullptr, weight_tail,
                                                 anchor_tail, ptr.weight_scales,
                                                 ptr.weight_index + i};
    const int updated = step_group<kPower, kForm>(tail, acc, data_tail, i, h, probe, squares,
                                                  tally.nonfinite);
    if (updated > 0) {
      tally.updated += updated;
      std::copy_n(param_tail, rest, ptr.param + i);
      std::copy_n(data_tail, rest, data + i);
    }
  }
  finish_tally(probe, squares, ptr.grad, n, h, tally);
  return tally;
}

// One tensor's memory, laid out alike (contiguous, or dense with equal strides): param, grad,
// accumulator, and importance and anchor where the penalty covers it (else nullptr); and its
// threshold, a value of its arithmetic type. A compressed accumulator's format, 8-bit scales,
// rounding key and the index of its first element within its parameter. The importance's
// dtype (an importance format), and its block scales where it is uint8.
struct TensorPointers {
  void* param;
  const void* grad;
  void* acc;
  const void* weight;
  const void* anchor;
  c10::ScalarType dtype;
  double threshold;
  AccFormat format = AccFormat::kExact;
  float* scales = nullptr;
  uint32_t key = 0;
  uint64_t index_offset = 0;
  c10::ScalarType weight_dtype = c10::ScalarType::Undefined;
  const float* weight_scales = nullptr;
};

// The threshold of a tensor with gradient mean `mean` (of its arithmetic type T, or nullptr):
// `threshold`, raised to tau * mean when tau > 0 (a NaN product selects nothing, as g*g > NaN
// is false).
template <typename T>
double tensor_threshold(double threshold, double tau, const at::Tensor* mean) {
  if (mean == nullptr || !(tau > 0.0)) {
    return static_cast<T>(threshold);
  }
  const T relative = static_cast<T>(tau) * *static_cast<const T*>(mean->const_data_ptr());
  return std::isnan(relative) ? relative : std::max(static_cast<T>(threshold), relative);
}

// A chunk of a tensor with a compressed accumulator (a chunk of an 8-bit one starts at a block).
template <Power kPower, PenaltyForm kForm, typename scalar_t, typename weight_t>
Tally step_compressed_chunk(const TensorPointers& t, const RangePointers<scalar_t, weight_t>& ptr,
                            const Chunk& chunk, const Hyper<float>& h) {
  const int64_t begin = chunk.begin;
  const int64_t n = chunk.end - begin;
  const uint64_t first_index = t.index_offset + static_cast<uint64_t>(begin);
  if (t.format == AccFormat::kBf16) {
    return step_compressed_range<kPower, kForm>(ptr, Bf16Acc{t.key, first_index},
                                                static_cast<uint16_t*>(t.acc) + begin, n, h);
  }
  TORCH_INTERNAL_ASSERT(begin % kScaleBlock == 0);
  const Block8Acc acc{t.key, first_index, t.scales + begin / kScaleBlock};
  return step_compressed_range<kPower, kForm>(ptr, acc, static_cast<uint8_t*>(t.acc) + begin, n,
                                              h);
}

// A chunk of a tensor whose importance (if any) is stored as weight_t (a chunk of a tensor with
// 8-bit importances starts at a block).
template <Power kPower, PenaltyForm kForm, typename scalar_t, typename weight_t>
Tally step_chunk_with(const TensorPointers& t, const Chunk& chunk, Hyper<math_t<scalar_t>> h) {
  h.threshold = static_cast<math_t<scalar_t>>(t.threshold);
  const int64_t begin = chunk.begin;
  const auto* weight = static_cast<const weight_t*>(t.weight);
  const auto* anchor = static_cast<const scalar_t*>(t.anchor);
  const bool exact = t.format == AccFormat::kExact;
  if constexpr (std::is_same_v<weight_t, uint8_t>) {
    TORCH_INTERNAL_ASSERT(begin % kScaleBlock == 0);
  }
  const RangePointers<scalar_t, weight_t> ptr{
      static_cast<scalar_t*>(t.param) + begin,
      static_cast<const scalar_t*>(t.grad) + begin,
      exact ? static_cast<math_t<scalar_t>*>(t.acc) + begin : nullptr,
      weight == nullptr ? nullptr : weight + begin,
      anchor == nullptr ? nullptr : anchor + begin,
      t.weight_scales,
      begin};
  if constexpr (!std::is_same_v<scalar_t, double>) {  // float64 params keep exact accumulators
    if (!exact) {
      return step_compressed_chunk<kPower, kForm>(t, ptr, chunk, h);
    }
  }
  return step_range<kPower, kForm>(ptr, chunk.end - begin, h);
}

// A chunk, its importance read in its format: the param's dtype, bfloat16 (float32 and float16
// params) or 8-bit codes (params but float64).
template <Power kPower, PenaltyForm kForm, typename scalar_t>
Tally step_chunk_as(const TensorPointers& t, const Chunk& chunk,
                    const Hyper<math_t<scalar_t>>& h) {
  if constexpr (kForm != PenaltyForm::kNone && !std::is_same_v<scalar_t, double>) {
    if (t.weight_dtype == c10::kByte) {
      return step_chunk_with<kPower, kForm, scalar_t, uint8_t>(t, chunk, h);
    }
    if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) {
      if (t.weight_dtype == c10::kBFloat16) {
        return step_chunk_with<kPower, kForm, scalar_t, c10::BFloat16>(t, chunk, h);
      }
    }
  }
  return step_chunk_with<kPower, kForm, scalar_t, scalar_t>(t, chunk, h);
}

template <Power kPower, PenaltyForm kForm>
Tally step_chunk(const TensorPointers& t, const Chunk& chunk, const Hyper<float>& hf,
                 const Hyper<double>& hd) {
  switch (t.dtype) {
    case c10::kFloat:
      return step_chunk_as<kPower, kForm, float>(t, chunk, hf);
    case c10::kBFloat16:
      return step_chunk_as<kPower, kForm, c10::BFloat16>(t, chunk, hf);
    case c10::kHalf:
      return step_chunk_as<kPower, kForm, c10::Half>(t, chunk, hf);
    case c10::kDouble:
      return step_chunk_as<kPower, kForm, double>(t, chunk, hd);
    default:
      TORCH_CHECK(false, "classp_step_: unsupported dtype ", t.dtype);
  }
}

// Tensors the penalty covers step with `kForm`, the others without.
template <Power kPower, PenaltyForm kForm>
void run_plan(const std::vector<TensorPointers>& tensors, const Plan& plan, const Hyper<float>& hf,
              const Hyper<double>& hd, std::vector<Tally>& tallies) {
  const int64_t num_parts = static_cast<int64_t>(plan.part_starts.size()) - 1;
  at::parallel_for(0, num_parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t i = plan.part_starts[part_begin]; i < plan.part_starts[part_end]; ++i) {
      const Chunk& chunk = plan.chunks[i];
      const TensorPointers& t = tensors[chunk.tensor];
      tallies[i] = t.weight == nullptr ? step_chunk<kPower, PenaltyForm::kNone>(t, chunk, hf, hd)
                                       : step_chunk<kPower, kForm>(t, chunk, hf, hd);
    }
  });
}

template <Power kPower>
void run_plan_for_form(PenaltyForm form, const std::vector<TensorPointers>& tensors,
                       const Plan& plan, const Hyper<float>& hf, const Hyper<double>& hd,
                       std::vector<Tally>& tallies) {
  switch (form) {
    case PenaltyForm::kNone:
      return run_plan<kPower, PenaltyForm::kNone>(tensors, plan, hf, hd, tallies);
    case PenaltyForm::kExplicit:
      return run_plan<kPower, PenaltyForm::kExplicit>(tensors, plan, hf, hd, tallies);
    case PenaltyForm::kProximal:
      return run_plan<kPower, PenaltyForm::kProximal>(tensors, plan, hf, hd, tallies);
  }
}

// Whether the kernel can work on the tensors' memory directly: equal strides, no gaps.
bool same_dense_layout(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& acc,
                       const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& anchor) {
  return param.is_non_overlapping_and_dense() && grad.strides() == param.strides() &&
         acc.strides() == param.strides() &&
         (!weight.has_value() || weight->strides() == param.strides()) &&
         (!anchor.has_value() || anchor->strides() == param.strides());
}

at::Tensor classp_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList accs,
                           const at::Tensor& lr, double threshold, double eps, double power,
                           bool apply_scaling, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf,
                           const c10::List<std::optional<at::Tensor>>& importances,
                           const c10::List<std::optional<at::Tensor>>& anchors,
                           c10::string_view penalty_form, double penalty_scale,
                           at::TensorList importance_scales,
                           double relative_threshold, at::TensorList grad_sq_means,
                           at::TensorList acc_scales,
                           const std::optional<at::Tensor>& rounding_keys,
                           c10::IntArrayRef index_offsets) {
  const c10::Device cpu(c10::kCPU);
  check_step_inputs(params, grads, accs, lr, threshold, eps, power, grad_scale, found_inf, cpu,
                    /*compressed=*/true);
  const PenaltyForm form = check_penalty_inputs(params, importances, importance_scales, anchors,
                                                penalty_form, penalty_scale);
  check_grad_sq_means(params, relative_threshold, grad_sq_means);
  check_compressed_inputs(params, accs, acc_scales, rounding_keys, index_offsets, cpu);
  const bool sum_squares = !grad_sq_means.empty();
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor counts = at::zeros({n, 2}, at::TensorOptions().dtype(at::kLong));
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) {
    return counts;  // an overflowed AMP step changes and counts nothing
  }
  const double lr_value = lr.item<double>();
  const std::optional<double> scale =
      grad_scale.has_value() ? std::optional<double>(grad_scale->item<double>()) : std::nullopt;
  const auto hf = make_hyper<float>(lr_value, threshold, eps, power, apply_scaling, scale,
                                    penalty_scale, sum_squares);
  const auto hd = make_hyper<double>(lr_value, threshold, eps, power, apply_scaling, scale,
                                     penalty_scale, sum_squares);

  // Tensors laid out differently are updated on contiguous copies, written back afterwards.
  std::vector<at::Tensor> work_params(n), work_grads(n), work_accs(n), work_weights(n),
      work_anchors(n);
  std::vector<TensorPointers> tensors(n);
  std::vector<int64_t> numels(n);
  std::vector<int64_t> alignments(n, 1);  // chunks of 8-bit accs and importances start at blocks
  int64_t total = 0;
  size_t num_scales = 0;
  size_t num_weight_scales = 0;
  for (int64_t i = 0; i < n; ++i) {
    std::optional<at::Tensor> weight, anchor;
    if (form != PenaltyForm::kNone) {
      weight = importances.get(i);
      anchor = anchors.get(i);
    }
    const bool direct = same_dense_layout(params[i], grads[i], accs[i], weight, anchor);
    work_params[i] = direct ? params[i] : params[i].contiguous();
    work_grads[i] = direct ? grads[i] : grads[i].contiguous();
    work_accs[i] = direct ? accs[i] : accs[i].contiguous();
    if (weight.has_value()) {
      work_weights[i] = direct ? *weight : weight->contiguous();
      work_anchors[i] = direct ? *anchor : anchor->contiguous();
    }
    numels[i] = params[i].numel();
    total += numels[i];
    const bool wide = params[i].scalar_type() == c10::kDouble;
    const at::Tensor* mean = sum_squares ? &grad_sq_means[i] : nullptr;
    tensors[i] = {work_params[i].data_ptr(),
                  work_grads[i].data_ptr(),
                  work_accs[i].data_ptr(),
                  weight.has_value() ? work_weights[i].data_ptr() : nullptr,
                  weight.has_value() ? work_anchors[i].data_ptr() : nullptr,
                  params[i].scalar_type(),
                  wide ? tensor_threshold<double>(threshold, relative_threshold, mean)
                       : tensor_threshold<float>(threshold, relative_threshold, mean)};
    if (weight.has_value()) {
      tensors[i].weight_dtype = weight->scalar_type();
      if (weight->scalar_type() == c10::kByte) {
        tensors[i].weight_scales = importance_scales[num_weight_scales++].const_data_ptr<float>();
        alignments[i] = kScaleBlock;
      }
    }
    const auto acc_dtype = accs[i].scalar_type();
    if (acc_dtype == c10::kBFloat16 || acc_dtype == c10::kByte) {
      TensorPointers& t = tensors[i];
      t.format = acc_dtype == c10::kBFloat16 ? AccFormat::kBf16 : AccFormat::k8Bit;
      if (t.format == AccFormat::k8Bit) {
        t.scales = acc_scales[num_scales++].data_ptr<float>();
        alignments[i] = kScaleBlock;
      }
      t.key = static_cast<uint32_t>(rounding_keys->accessor<int64_t, 1>()[i]);
      t.index_offset = static_cast<uint64_t>(index_offsets[i]);
    }
  }

  const int64_t num_parts =
      std::clamp<int64_t>(total / kMinElementsPerThread, 1, at::get_num_threads());
  const Plan plan = plan_work(numels, num_parts, alignments);
  std::vector<Tally> tallies(plan.chunks.size());
  if (power == 1.0) {
    run_plan_for_form<Power::kOne>(form, tensors, plan, hf, hd, tallies);
  } else if (power == 2.0) {
    run_plan_for_form<Power::kTwo>(form, tensors, plan, hf, hd, tallies);
  } else {
    run_plan_for_form<Power::kGeneric>(form, tensors, plan, hf, hd, tallies);
  }

  auto counts_data = counts.accessor<int64_t, 2>();
  std::vector<double> square_sums(n, 0.0);
  for (size_t i = 0; i < plan.chunks.size(); ++i) {
    counts_data[plan.chunks[i].tensor][0] += tallies[i].updated;
    counts_data[plan.chunks[i].tensor][1] += tallies[i].nonfinite;
    square_sums[plan.chunks[i].tensor] += tallies[i].square_sum;
  }
  for (int64_t i = 0; sum_squares && i < n; ++i) {
    if (numels[i] == 0) {
      continue;  // an empty tensor keeps its mean
    }
    // one division: exact sums give the correctly rounded mean in either dtype
    void* mean = grad_sq_means[i].mutable_data_ptr();
    if (params[i].scalar_type() == c10::kDouble) {
      *static_cast<double*>(mean) = square_sums[i] / static_cast<double>(numels[i]);
    } else {
      *static_cast<float*>(mean) = static_cast<float>(square_sums[i] / numels[i]);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!work_params[i].is_same(params[i])) {
      params[i].copy_(work_params[i]);
    }
    if (!work_accs[i].is_same(accs[i])) {
      accs[i].copy_(work_accs[i]);
    }
  }
  return counts;
}

// The work split of a step over tensors of `numels` elements among `num_parts` threads (cut
// only at multiples of `alignments`, one per tensor, or empty): the (chunks, 3) int64 table of
// [tensor, begin, end] rows and the first chunk of each part (ending with the number of
// chunks); and the CUDA kernel's work table over the non-empty tensors, with addresses 0 and
// each tensor's index as its row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_plan(c10::IntArrayRef numels,
                                                          int64_t num_parts,
                                                          c10::IntArrayRef alignments) {
  TORCH_CHECK(num_parts > 0, "_chunk_plan: num_parts must be positive");
  TORCH_CHECK(alignments.empty() || alignments.size() == numels.size(),
              "_chunk_plan: alignments must be empty or have one entry per tensor");
  for (const int64_t align : alignments) {
    TORCH_CHECK(align > 0 && kChunkElements % align == 0,
                "_chunk_plan: an alignment must divide ", kChunkElements, ", got ", align);
  }
  const Plan plan = plan_work(numels.vec(), num_parts, alignments.vec());
  at::Tensor table = at::empty({static_cast<int64_t>(plan.chunks.size()), 3}, at::kLong);
  auto rows = table.accessor<int64_t, 2>();
  for (size_t i = 0; i < plan.chunks.size(); ++i) {
    rows[i][0] = plan.chunks[i].tensor;
    rows[i][1] = plan.chunks[i].begin;
    rows[i][2] = plan.chunks[i].end;
  }
  const auto as_tensor = [](const std::vector<int64_t>& values) {
    at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::kLong);
    std::copy(values.begin(), values.end(), out.data_ptr<int64_t>());
    return out;
  };
  std::vector<TensorRecord> records;
  for (int64_t i = 0; i < static_cast<int64_t>(numels.size()); ++i) {
    if (numels[i] > 0) {
      records.push_back({0, 0, 0, numels[i], i, 0, 0});
    }
  }
  return {table, as_tensor(plan.part_starts), as_tensor(work_table(records))};
}

}  // namespace
}  // namespace classp

TORCH_LIBRARY(classp_fused, m) {
  m.def(
      "classp_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] accs, Tensor lr, "
      "float threshold, float eps, float power, bool apply_scaling, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor?[] importances, Tensor?[] anchors, str penalty_form, "
      "float penalty_scale, Tensor[] importance_scales, float relative_threshold, "
      "Tensor(c!)[] grad_sq_means, "
      "Tensor(d!)[] acc_scales, Tensor? rounding_keys, int[] index_offsets) -> Tensor");
  m.def("_chunk_plan(int[] numels, int num_parts, int[] alignments=[]) -> (Tensor, Tensor, "
        "Tensor)",
        &classp::chunk_plan);
}

TORCH_LIBRARY_IMPL(classp_fused, CPU, m) {
  m.impl("classp_step_", &classp::classp_step_cpu);
}
