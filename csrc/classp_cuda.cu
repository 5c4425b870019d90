// CUDA kernels of classp_fused::classp_step_: one launch per dtype group.
//
// The launch reads a work table in device memory (classp_plan.h: a record per tensor, an entry
// per chunk of kChunkElements), built by the op once per set of tensor addresses. Its blocks are
// persistent: as many as the GPU holds at once, each striding over the chunks. A thread keeps
// kIlp 128-bit packs of params, grads and accumulators in flight; grads, read once, are loaded
// with the streaming (evict-first) cache hint. A full pack is updated without branches on its
// elements and written back whole when any element was selected (unselected elements with the
// bits just read), never when none was. Arithmetic is fp32 (fp64 for fp64 params) with
// explicitly rounded operations (no FMA contraction, IEEE division and square root: the CPU
// kernel's results). lr, grad_scale and found_inf are read on the device; counts are summed per
// block and tensor and added atomically. A launch over tensors a penalty covers (SPEC section
// 4a), their importances all of one format, also reads importances and anchors in streaming
// loads (128-bit words, or narrower ones for importances in a format narrower than the params)
// and applies the penalty in the same pass (explicit: into the gradient; proximal: into the new
// value). An importance in the param's dtype or bfloat16 is widened exactly, one of 8-bit codes
// decoded with its block's scale (classp_fused/state_formats.py), also exact. With
// gradient means (the relative threshold) a tensor's threshold is raised to tau * S, S read
// from the means the op stacked before the launch, and the squared finite gradients (after the
// explicit penalty) and element counts are summed like the counts into scratch the op turns
// into the new means after the launch.
//
// Compressed accumulators (classp_fused/state_formats.py) take launches of their own. bfloat16
// ones are decoded to fp32 and each selected element's new value is rounded stochastically
// (its fp32 bits plus 16 random bits, truncated) in the packs as above. 8-bit codes are
// stepped a block of kCodeBlock elements per warp, 8 per lane: the old values decoded with the
// block's scale, and a block with a selected element encoded again whole, with a new scale from
// its maximum (a warp reduction), the lanes storing their 8 codes and lane 0 the scale. The
// random bits of an element come from its index within its parameter and the tensor's rounding
// key, read on the device. Every operation the codes depend on is rounded on its own, as the
// reference computes it: integer steps on the bits, and x / scale as a product with the exact
// power of two 1 / scale.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "classp_cuda.h"
#include "classp_plan.h"

namespace classp {
namespace {

constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;  // one 128-bit load or store
constexpr int kIlp = 2;           // packs per thread in flight
constexpr int kMaxDevices = 64;
constexpr int kWarp = 32;
constexpr int kCodesPerLane = kCodeBlock / kWarp;   // a warp steps a block
constexpr uint32_t kCodeBias = (127 - 32) << 3;     // fp32 bits >> 20 of code 8 (2**-31)
constexpr float kSaturation = 0x1.ep126f;           // 15/16 * 2**127: the top code at E = 127

enum class Power { kOne, kTwo, kGeneric };

template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

__device__ __forceinline__ double read_scalar(const ScalarArg& s) {
  if (s.ptr == nullptr) {
    return s.host_value;
  }
  return s.is_double ? *static_cast<const double*>(s.ptr) : *static_cast<const float*>(s.ptr);
}

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ float log2_of(float a) { return log2f(a); }
__device__ __forceinline__ double log2_of(double a) { return log2(a); }
__device__ __forceinline__ float exp2_of(float a) { return exp2f(a); }
__device__ __forceinline__ double exp2_of(double a) { return exp2(a); }

// lowbias32 (state_formats.mix32) in wrapping uint32 arithmetic.
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// The 32 random bits of element `index` (within its parameter) under `key`:
// state_formats.element_bits.
__device__ __forceinline__ uint32_t element_bits(uint32_t key, uint64_t index) {
  return mix32(static_cast<uint32_t>(index) ^ mix32(key + static_cast<uint32_t>(index >> 32)));
}

// How an accumulator of format kAcc is stored, for arithmetic in T: as T itself, or as the
// upper 16 bits of a float (bfloat16).
template <AccFormat kAcc, typename T>
using acc_storage_t = std::conditional_t<kAcc == AccFormat::kBFloat16, uint16_t, T>;

template <AccFormat kAcc, typename T>
__device__ __forceinline__ T decode_acc(acc_storage_t<kAcc, T> stored) {
  if constexpr (kAcc == AccFormat::kBFloat16) {
    return __uint_as_float(static_cast<uint32_t>(stored) << 16);
  } else {
    return stored;
  }
}

// A selected element's new accumulator value as stored: bfloat16 rounded stochastically (the
// fp32 bits plus the low 16 random bits, truncated; state_formats.round_bf16).
template <AccFormat kAcc, typename T>
__device__ __forceinline__ acc_storage_t<kAcc, T> encode_acc(T value, uint32_t key,
                                                             uint64_t index) {
  if constexpr (kAcc == AccFormat::kBFloat16) {
    return static_cast<uint16_t>((__float_as_uint(value) + (element_bits(key, index) & 0xFFFFu))
                                 >> 16);
  } else {
    return value;
  }
}

// The value of 8-bit code `c` in a block of scale `scale`: both products exact
// (state_formats.decode).
__device__ __forceinline__ float decode_code(uint32_t c, float scale) {
  const float q = c >= 8 ? __uint_as_float((c + kCodeBias) << 20)
                         : __fmul_rn(static_cast<float>(c), 0x1p-34f);
  return __fmul_rn(q, scale);
}

// How an importance of format kW of scalar_t params is stored: as scalar_t, as the upper 16 bits
// of a float (bfloat16), or as an 8-bit code.
template <ImportanceFormat kW, typename scalar_t>
using weight_storage_t =
    std::conditional_t<kW == ImportanceFormat::kParam, scalar_t,
                       std::conditional_t<kW == ImportanceFormat::kBFloat16, uint16_t, uint8_t>>;

// The value in T of a stored importance (exact); `scale` is that of its 8-bit block (kCode8).
template <ImportanceFormat kW, typename T, typename S>
__device__ __forceinline__ T decode_weight(S stored, float scale) {
  if constexpr (kW == ImportanceFormat::kParam) {
    return static_cast<T>(stored);
  } else if constexpr (kW == ImportanceFormat::kBFloat16) {
    return __uint_as_float(static_cast<uint32_t>(stored) << 16);
  } else {
    return decode_code(stored, scale);
  }
}

// The scale of the 8-bit block of element `i` of importances whose blocks' scales start at
// `scales` (kCode8; 0 for the other formats, which have none).
template <ImportanceFormat kW>
__device__ __forceinline__ float weight_scale(const float* scales, int i) {
  if constexpr (kW == ImportanceFormat::kCode8) {
    return __ldg(scales + i / kCodeBlock);
  } else {
    return 0.0f;
  }
}

// The code of `x` (>= 0, at most the block's top) in a block of scale 1 / `inverse`, rounded
// with `bits` (state_formats.encode_blocks): a positive x never gets code 0.
__device__ __forceinline__ uint32_t encode_code(float x, float inverse, uint32_t bits) {
  const float q = __fmul_rn(x, inverse);  // x / scale, exact
  const bool low = q < 0x1p-31f;
  const uint32_t shifted = __float_as_uint(low ? __fadd_rn(q, 0x1p-31f) : q);
  const int code = static_cast<int>((shifted + (bits & 0xFFFFFu)) >> 20) -
                   static_cast<int>(kCodeBias) - (low ? 8 : 0);
  return x > 0.0f ? static_cast<uint32_t>(max(code, 1)) : 0u;
}

// The block scale 2**E for a block maximum `top` (0 for 0), E the smallest exponent >= -115
// with top <= 15/16 * 2**E, and 2**-E (a subnormal for E = 127): state_formats.block_scales.
__device__ __forceinline__ void block_scale(float top, float& scale, float& inverse) {
  const uint32_t bits = __float_as_uint(fmaxf(top, 0x1p-116f));
  const int exponent = static_cast<int>(bits >> 23) - 126 + ((bits & 0x7FFFFFu) > 0x700000u);
  scale = top > 0.0f ? __uint_as_float(static_cast<uint32_t>(exponent + 127) << 23) : 0.0f;
  inverse = __uint_as_float(exponent <= 126 ? static_cast<uint32_t>(127 - exponent) << 23
                                            : 1u << 22);
}

// The step's scalars in the arithmetic type, rounded as the reference rounds them; `threshold`
// is the current tensor's, `factor` the penalty's 2 * scale, `cap` the bound of its proximal
// coefficient.
template <typename T>
struct Hyper {
  T lr, threshold, eps, power, inv_power, grad_scale, factor, cap;
  bool apply_scaling, has_grad_scale, sum_squares;
};

// The CLASSP update of one element, computed whether or not it is selected (no branch on the
// element's values): whether it is selected and finite, and its new values if selected; with
// `h.sum_squares` its finite squared gradient is added to `squares`. `weight` and `anchor`
// (importance and anchor) are read with a penalty only.
template <Power kPower, PenaltyForm kForm, typename T>
__device__ __forceinline__ void step_element(T param, T grad, T acc, T weight, T anchor,
                                             const Hyper<T>& h, bool& selected, bool& finite,
                                             T& new_param, T& new_acc, T& squares) {
  if (h.has_grad_scale) {
    grad = div_rn(grad, h.grad_scale);
  }
  if constexpr (kForm == PenaltyForm::kExplicit) {
    grad = add_rn(grad, mul_rn(h.factor, mul_rn(weight, sub_rn(param, anchor))));
  }
  const T magnitude = fabs(grad);
  const T square = mul_rn(grad, grad);
  finite = isfinite(grad);
  selected = finite & (square > h.threshold);
  if (h.sum_squares) {
    squares = add_rn(squares, finite ? square : T(0));
  }
  if constexpr (kPower == Power::kOne) {
    new_acc = add_rn(acc, magnitude);
  } else if constexpr (kPower == Power::kTwo) {
    new_acc = add_rn(acc, square);
  } else {
    new_acc = add_rn(acc, exp2_of(mul_rn(h.power, log2_of(magnitude))));
  }
  T step = grad;
  T eta = h.lr;  // the step size of the element (read by the proximal form)
  if (h.apply_scaling) {
    const T denom = add_rn(h.eps, new_acc);
    if constexpr (kPower == Power::kOne) {
      step = div_rn(grad, denom);
      eta = div_rn(h.lr, denom);
    } else if constexpr (kPower == Power::kTwo) {
      const T root = div_rn(T(1), sqrt_rn(denom));
      step = mul_rn(grad, root);
      eta = mul_rn(h.lr, root);
    } else {
      const T root = exp2_of(mul_rn(log2_of(denom), -h.inv_power));  // no 1/denom overflow
      step = mul_rn(grad, root);
      eta = mul_rn(h.lr, root);
    }
  }
  new_param = sub_rn(param, mul_rn(h.lr, step));
  if constexpr (kForm == PenaltyForm::kProximal) {
    T c = mul_rn(mul_rn(h.factor, weight), eta);
    c = c > h.cap ? h.cap : c;  // a NaN c stays NaN
    new_param = add_rn(new_param, mul_rn(div_rn(c, add_rn(T(1), c)), sub_rn(anchor, new_param)));
  }
}

// The word a Vector of kBytes is loaded and stored in: 128 bits, or for the Vectors smaller than
// that (importances in a format narrower than the params) 64 or 32 bits.
template <int kBytes>
using word_t = std::conditional_t<kBytes % kVectorBytes == 0, uint4,
                                  std::conditional_t<kBytes % 8 == 0, uint2, uint32_t>>;

// N elements of T in whole words: 128-bit ones, or one word of 64 or 32 bits.
template <typename T, int N>
struct alignas(sizeof(word_t<sizeof(T) * N>)) Vector {
  using Word = word_t<sizeof(T) * N>;
  static_assert(sizeof(T) * N % kVectorBytes == 0 || sizeof(T) * N == sizeof(Word),
                "a Vector is made of 128-bit words, or is one word of 64 or 32 bits");
  static constexpr int kWords = sizeof(T) * N / sizeof(Word);
  T v[N];
};

// Loads and stores name the global state space (ld.global / st.global): the addresses come from
// the work table, where the compiler cannot see which space they point to.
template <typename V>
__device__ __forceinline__ V load_vector(const V* ptr) {
  V out;
#pragma unroll
  for (int k = 0; k < V::kWords; ++k) {
    using Word = typename V::Word;
    reinterpret_cast<Word*>(&out)[k] = __ldcg(reinterpret_cast<const Word*>(ptr) + k);
  }
  return out;
}

// A load with the streaming (evict-first) hint: for data read once.
template <typename V>
__device__ __forceinline__ V load_vector_streaming(const V* ptr) {
  V out;
#pragma unroll
  for (int k = 0; k < V::kWords; ++k) {
    using Word = typename V::Word;
    reinterpret_cast<Word*>(&out)[k] = __ldcs(reinterpret_cast<const Word*>(ptr) + k);
  }
  return out;
}

template <typename V>
__device__ __forceinline__ void store_vector(V* ptr, const V& value) {
#pragma unroll
  for (int k = 0; k < V::kWords; ++k) {
    using Word = typename V::Word;
    __stcg(reinterpret_cast<Word*>(ptr) + k, reinterpret_cast<const Word*>(&value)[k]);
  }
}

__device__ __forceinline__ bool is_vector_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kVectorBytes == 0;
}

// Elements of a pack: one 128-bit word of params or of accumulators, whichever are narrower.
template <typename scalar_t, typename storage_t>
constexpr int kPack = kVectorBytes / (sizeof(scalar_t) < sizeof(storage_t) ? sizeof(scalar_t)
                                                                            : sizeof(storage_t));

// Updates one pack in registers; writes it back whole if any element was selected. `w` and
// `m` (importances in format kW, `w_scale` their 8-bit block's scale, and anchors) are read
// with a penalty only; `index` is the index of the pack's first element within its parameter,
// for the random bits of compressed accumulators.
template <Power kPower, PenaltyForm kForm, AccFormat kAcc, ImportanceFormat kW, typename scalar_t,
          typename T, int kP = kPack<scalar_t, acc_storage_t<kAcc, T>>>
__device__ __forceinline__ void update_pack(Vector<scalar_t, kP>& p, const Vector<scalar_t, kP>& g,
                                            Vector<acc_storage_t<kAcc, T>, kP>& a,
                                            const Vector<weight_storage_t<kW, scalar_t>, kP>& w,
                                            float w_scale, const Vector<scalar_t, kP>& m,
                                            const Hyper<T>& h, uint32_t key, uint64_t index,
                                            Vector<scalar_t, kP>* p_out,
                                            Vector<acc_storage_t<kAcc, T>, kP>* a_out,
                                            int& updated, int& nonfinite, T& squares) {
  int selected_count = 0;
#pragma unroll
  for (int e = 0; e < kP; ++e) {
    bool selected, finite;
    T new_param, new_acc;
    step_element<kPower, kForm>(static_cast<T>(p.v[e]), static_cast<T>(g.v[e]),
                                decode_acc<kAcc, T>(a.v[e]), decode_weight<kW, T>(w.v[e], w_scale),
                                static_cast<T>(m.v[e]), h, selected, finite, new_param, new_acc,
                                squares);
    p.v[e] = selected ? static_cast<scalar_t>(new_param) : p.v[e];
    a.v[e] = selected ? encode_acc<kAcc>(new_acc, key, index + e) : a.v[e];
    selected_count += selected;
    nonfinite += !finite;
  }
  updated += selected_count;
  if (selected_count != 0) {
    store_vector(p_out, p);
    store_vector(a_out, a);
  }
}

// Updates the `n` elements of one chunk: packs of 128-bit words where all its tensors are
// aligned (importances in a narrower format than the params: 64- or 32-bit words), kIlp packs
// in flight per thread, then one element at a time. `weight` and `anchor` (importances in
// format kW, with the scales of their 8-bit blocks from `weight_scales` on (kCode8), and
// anchors) are read with a penalty only; compressed accumulators are rounded with the bits of
// `key` at indices from `first_index` (that of the chunk's first element).
template <Power kPower, PenaltyForm kForm, AccFormat kAcc, ImportanceFormat kW, typename scalar_t,
          typename T>
__device__ __forceinline__ void update_chunk(scalar_t* param, const scalar_t* grad,
                                             acc_storage_t<kAcc, T>* acc,
                                             const weight_storage_t<kW, scalar_t>* weight,
                                             const float* weight_scales, const scalar_t* anchor,
                                             int n, uint32_t key, uint64_t first_index,
                                             const Hyper<T>& h, int& updated, int& nonfinite,
                                             T& squares) {
  using storage_t = acc_storage_t<kAcc, T>;
  constexpr int kP = kPack<scalar_t, storage_t>;
  static_assert(kCodeBlock % kP == 0, "a pack lies in one 8-bit block of importances");
  constexpr bool kPenalty = kForm != PenaltyForm::kNone;
  using ParamPack = Vector<scalar_t, kP>;
  using AccPack = Vector<storage_t, kP>;
  using WeightPack = Vector<weight_storage_t<kW, scalar_t>, kP>;
  int scalar_from = 0;
  if (is_vector_aligned(param) && is_vector_aligned(grad) && is_vector_aligned(acc) &&
      (!kPenalty || (is_vector_aligned(weight) && is_vector_aligned(anchor)))) {
    auto* params = reinterpret_cast<ParamPack*>(param);
    const auto* grads = reinterpret_cast<const ParamPack*>(grad);
    auto* accs = reinterpret_cast<AccPack*>(acc);
    const auto* weights = reinterpret_cast<const WeightPack*>(weight);
    const auto* anchors = reinterpret_cast<const ParamPack*>(anchor);
    const int packs = n / kP;
    int i = threadIdx.x;
    for (; i + (kIlp - 1) * kThreads < packs; i += kIlp * kThreads) {
      ParamPack p[kIlp], g[kIlp], m[kIlp]{};
      AccPack a[kIlp];
      WeightPack w[kIlp]{};
      float w_scale[kIlp] = {};
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        p[k] = load_vector(params + i + k * kThreads);
        g[k] = load_vector_streaming(grads + i + k * kThreads);
        a[k] = load_vector(accs + i + k * kThreads);
        if constexpr (kPenalty) {
          w[k] = load_vector_streaming(weights + i + k * kThreads);
          w_scale[k] = weight_scale<kW>(weight_scales, (i + k * kThreads) * kP);
          m[k] = load_vector_streaming(anchors + i + k * kThreads);
        }
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int pack = i + k * kThreads;
        update_pack<kPower, kForm, kAcc, kW>(p[k], g[k], a[k], w[k], w_scale[k], m[k], h, key,
                                             first_index + static_cast<uint64_t>(pack) * kP,
                                             params + pack, accs + pack, updated, nonfinite,
                                             squares);
      }
    }
    for (; i < packs; i += kThreads) {
      ParamPack p = load_vector(params + i);
      AccPack a = load_vector(accs + i);
      ParamPack m{};
      WeightPack w{};
      float w_scale = 0.0f;
      if constexpr (kPenalty) {
        w = load_vector_streaming(weights + i);
        w_scale = weight_scale<kW>(weight_scales, i * kP);
        m = load_vector_streaming(anchors + i);
      }
      update_pack<kPower, kForm, kAcc, kW>(p, load_vector_streaming(grads + i), a, w, w_scale, m,
                                           h, key, first_index + static_cast<uint64_t>(i) * kP,
                                           params + i, accs + i, updated, nonfinite, squares);
    }
    scalar_from = packs * kP;
  }
  for (int i = scalar_from + threadIdx.x; i < n; i += kThreads) {
    bool selected, finite;
    T new_param, new_acc;
    T w = T(0);
    T m = T(0);
    if constexpr (kPenalty) {
      w = decode_weight<kW, T>(weight[i], weight_scale<kW>(weight_scales, i));
      m = static_cast<T>(anchor[i]);
    }
    step_element<kPower, kForm>(static_cast<T>(param[i]), static_cast<T>(grad[i]),
                                decode_acc<kAcc, T>(acc[i]), w, m, h, selected, finite,
                                new_param, new_acc, squares);
    if (selected) {
      param[i] = static_cast<scalar_t>(new_param);
      acc[i] = encode_acc<kAcc>(new_acc, key, first_index + i);
    }
    updated += selected;
    nonfinite += !finite;
  }
}

// The largest of `value` over the warp, in every lane.
__device__ __forceinline__ float warp_max(float value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

// Updates the `n` elements of one chunk of a tensor with 8-bit accumulator codes, `scales` the
// scales of its blocks: block b by warp b mod (warps per thread block), kCodesPerLane
// consecutive elements per lane, in 128-bit words of params and grads (and importances, in one
// 64-bit word when 8-bit codes, and anchors) and one 64-bit word of codes where the chunk's
// tensors are aligned and the lane's elements all lie in the chunk, one element at a time
// otherwise. Importances in format kW have the scales of their 8-bit blocks (kCode8) from
// `weight_scales` on, in the blocks of the accumulator codes. A block with a selected
// element gets new codes throughout and a new scale (state_formats.encode_blocks of the new
// values of its selected elements, clamped to kSaturation, and the old values of the others);
// the other blocks are not written. The random bits are those of `key` at indices from
// `first_index` (that of the chunk's first element).
template <Power kPower, PenaltyForm kForm, ImportanceFormat kW, typename scalar_t>
__device__ __forceinline__ void update_chunk_codes(scalar_t* param, const scalar_t* grad,
                                                   uint8_t* codes, float* scales,
                                                   const weight_storage_t<kW, scalar_t>* weight,
                                                   const float* weight_scales,
                                                   const scalar_t* anchor, int n, uint32_t key,
                                                   uint64_t first_index, const Hyper<float>& h,
                                                   int& updated, int& nonfinite,
                                                   float& squares) {
  constexpr bool kPenalty = kForm != PenaltyForm::kNone;
  constexpr int kL = kCodesPerLane;
  using ParamPack = Vector<scalar_t, kL>;
  using WeightPack = Vector<weight_storage_t<kW, scalar_t>, kL>;
  using CodePack = uint2;  // kL codes
  static_assert(sizeof(CodePack) == kL, "a lane's codes are one 64-bit word");
  const bool aligned = is_vector_aligned(param) && is_vector_aligned(grad) &&
                       reinterpret_cast<uintptr_t>(codes) % sizeof(CodePack) == 0 &&
                       (!kPenalty || (is_vector_aligned(weight) && is_vector_aligned(anchor)));
  const int lane = threadIdx.x % kWarp;
  const int blocks = (n + kCodeBlock - 1) / kCodeBlock;
  for (int b = threadIdx.x / kWarp; b < blocks; b += kThreads / kWarp) {  // the same in a warp
    const int first = b * kCodeBlock + lane * kL;  // the lane's first element
    const bool whole = aligned && first + kL <= n;
    ParamPack p{}, g{}, m{};
    WeightPack w{};
    uint8_t c[kL] = {};
    if (whole) {
      p = load_vector(reinterpret_cast<const ParamPack*>(param + first));
      g = load_vector_streaming(reinterpret_cast<const ParamPack*>(grad + first));
      if constexpr (kPenalty) {
        w = load_vector_streaming(reinterpret_cast<const WeightPack*>(weight + first));
        m = load_vector_streaming(reinterpret_cast<const ParamPack*>(anchor + first));
      }
      const CodePack word = __ldcg(reinterpret_cast<const CodePack*>(codes + first));
      memcpy(c, &word, sizeof(word));
    } else {
#pragma unroll
      for (int e = 0; e < kL; ++e) {
        if (first + e < n) {  // elements past the end stay 0: never selected, worth 0
          p.v[e] = param[first + e];
          g.v[e] = grad[first + e];
          c[e] = codes[first + e];
          if constexpr (kPenalty) {
            w.v[e] = weight[first + e];
            m.v[e] = anchor[first + e];
          }
        }
      }
    }
    const float old_scale = __ldcg(scales + b);
    const float w_scale = weight_scale<kW>(weight_scales, b * kCodeBlock);
    float x[kL];  // the values the block is encoded from
    float top = 0.0f;
    int selected_count = 0;
    unsigned selected_mask = 0;
#pragma unroll
    for (int e = 0; e < kL; ++e) {
      bool selected, finite;
      float new_param, new_acc;
      const float old = decode_code(c[e], old_scale);
      step_element<kPower, kForm>(static_cast<float>(p.v[e]), static_cast<float>(g.v[e]), old,
                                  decode_weight<kW, float>(w.v[e], w_scale),
                                  static_cast<float>(m.v[e]), h, selected, finite, new_param,
                                  new_acc, squares);
      x[e] = selected ? fminf(new_acc, kSaturation) : old;
      top = fmaxf(top, x[e]);
      p.v[e] = selected ? static_cast<scalar_t>(new_param) : p.v[e];
      selected_count += selected;
      selected_mask |= static_cast<unsigned>(selected) << e;
      nonfinite += !finite;
    }
    updated += selected_count;
    if (__ballot_sync(0xffffffffu, selected_count != 0) == 0) {
      continue;  // the block keeps its codes and scale
    }
    float scale, inverse;
    block_scale(warp_max(top), scale, inverse);
#pragma unroll
    for (int e = 0; e < kL; ++e) {
      c[e] = static_cast<uint8_t>(
          encode_code(x[e], inverse, element_bits(key, first_index + first + e)));
    }
    if (whole) {
      CodePack word;
      memcpy(&word, c, sizeof(word));
      __stcg(reinterpret_cast<CodePack*>(codes + first), word);
      if (selected_mask != 0) {
        store_vector(reinterpret_cast<ParamPack*>(param + first), p);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kL; ++e) {
        if (first + e < n) {
          codes[first + e] = c[e];
        }
        if (selected_mask >> e & 1u) {
          param[first + e] = p.v[e];
        }
      }
    }
    if (lane == 0) {
      scales[b] = scale;
    }
  }
}

// Sums `value` over the block; the result is valid in thread 0. Starts with a barrier, so the
// scratch space can be reused by consecutive calls.
template <typename V>
__device__ __forceinline__ V block_sum(V value, V* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) {
    scratch[threadIdx.x / 32] = value;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    value = threadIdx.x < kThreads / 32 ? scratch[threadIdx.x] : 0;
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

// Adds the block's counts for one counts row (called by every thread of the block), and with
// gradient means its squared gradients and its `size` elements (the same in every thread).
__device__ __forceinline__ void add_counts(int64_t row, int updated, int nonfinite,
                                           int64_t* counts, long long* scratch, double squares,
                                           unsigned long long size, const MeanArgs& means) {
  if (means.square_sums != nullptr) {
    const double block_squares = block_sum(squares, reinterpret_cast<double*>(scratch));
    if (threadIdx.x == 0) {
      atomicAdd(means.square_sums + row, block_squares);
      atomicAdd(means.sizes + row, size);
    }
  }
  const long long block_updated = block_sum<long long>(updated, scratch);
  const long long block_nonfinite = block_sum<long long>(nonfinite, scratch);
  if (threadIdx.x == 0) {
    auto* out = reinterpret_cast<unsigned long long*>(counts + 2 * row);
    if (block_updated != 0) {
      atomicAdd(out, static_cast<unsigned long long>(block_updated));
    }
    if (block_nonfinite != 0) {
      atomicAdd(out + 1, static_cast<unsigned long long>(block_nonfinite));
    }
  }
}

template <typename scalar_t, Power kPower, PenaltyForm kForm, AccFormat kAcc, ImportanceFormat kW>
__global__ void __launch_bounds__(kThreads)
    classp_step_kernel(const DeviceWorkTable table, const StepArgs args, int64_t* counts) {
  using T = math_t<scalar_t>;
  using weight_t = weight_storage_t<kW, scalar_t>;
  if (args.has_found_inf && read_scalar(args.found_inf) != 0.0) {
    return;  // an overflowed AMP step changes and counts nothing
  }
  Hyper<T> h{static_cast<T>(read_scalar(args.lr)),
             static_cast<T>(args.threshold),
             static_cast<T>(args.eps),
             static_cast<T>(args.power),
             static_cast<T>(1.0 / args.power),
             static_cast<T>(args.has_grad_scale ? read_scalar(args.grad_scale) : 1.0),
             static_cast<T>(args.penalty_factor),
             std::numeric_limits<T>::max() / 2,
             args.apply_scaling,
             args.has_grad_scale,
             args.means.square_sums != nullptr};
  const T threshold = h.threshold;
  const bool relative = args.means.old_means != nullptr && args.means.relative_threshold > 0.0;
  const int64_t* entries = table.data + table.num_records * kRecordColumns;
  __shared__ long long scratch[kThreads / 32];

  // Counts accumulate per thread while consecutive chunks of the block belong to one tensor.
  int64_t row = -1;
  int updated = 0;
  int nonfinite = 0;
  T squares = 0;
  unsigned long long size = 0;
  uint32_t key = 0;  // the rounding key of the row's compressed accumulator
  for (int64_t c = blockIdx.x; c < table.num_chunks; c += gridDim.x) {
    const int64_t entry = __ldg(entries + c);
    const int64_t* record = table.data + (entry >> 32) * kRecordColumns;
    const int64_t begin = (entry & 0xffffffffLL) * kChunkElements;
    const int64_t record_row = __ldg(record + 4);
    if (record_row != row) {  // the same for every thread of the block
      if (row >= 0) {
        add_counts(row, updated, nonfinite, counts, scratch, squares, size, args.means);
      }
      row = record_row;
      updated = 0;
      nonfinite = 0;
      squares = 0;
      size = 0;
      if constexpr (kAcc != AccFormat::kExact) {
        key = static_cast<uint32_t>(__ldg(args.rounding_keys + row));
      }
      if (relative) {  // max(threshold, tau * S); a NaN product selects nothing
        const T bound = mul_rn(static_cast<T>(args.means.relative_threshold),
                               static_cast<T>(__ldg(args.means.old_means + row)));
        h.threshold = isnan(bound) || bound > threshold ? bound : threshold;
      }
    }
    const int64_t rest = __ldg(record + 3) - begin;
    const int n = static_cast<int>(rest < kChunkElements ? rest : kChunkElements);
    const weight_t* weight = nullptr;
    const float* weight_scales = nullptr;
    const scalar_t* anchor = nullptr;
    if constexpr (kForm != PenaltyForm::kNone) {
      weight = reinterpret_cast<const weight_t*>(__ldg(record + 5)) + begin;
      anchor = reinterpret_cast<const scalar_t*>(__ldg(record + 6)) + begin;
      if constexpr (kW == ImportanceFormat::kCode8) {
        weight_scales = reinterpret_cast<const float*>(__ldg(record + 9)) + begin / kCodeBlock;
      }
    }
    size += n;
    auto* param = reinterpret_cast<scalar_t*>(__ldg(record)) + begin;
    const auto* grad = reinterpret_cast<const scalar_t*>(__ldg(record + 1)) + begin;
    const uint64_t first_index = static_cast<uint64_t>(__ldg(record + 8) + begin);
    if constexpr (kAcc == AccFormat::kCode8) {
      static_assert(kChunkElements % kCodeBlock == 0, "chunks start on block boundaries");
      update_chunk_codes<kPower, kForm, kW>(
          param, grad, reinterpret_cast<uint8_t*>(__ldg(record + 2)) + begin,
          reinterpret_cast<float*>(__ldg(record + 7)) + begin / kCodeBlock, weight,
          weight_scales, anchor, n, key, first_index, h, updated, nonfinite, squares);
    } else {
      update_chunk<kPower, kForm, kAcc, kW>(
          param, grad, reinterpret_cast<acc_storage_t<kAcc, T>*>(__ldg(record + 2)) + begin,
          weight, weight_scales, anchor, n, key, first_index, h, updated, nonfinite, squares);
    }
  }
  if (row >= 0) {
    add_counts(row, updated, nonfinite, counts, scratch, squares, size, args.means);
  }
}

// Blocks of `kernel` the current device runs at once, computed once per kernel and device.
template <typename Kernel>
cudaError_t resident_blocks(Kernel kernel, std::atomic<int>* known, int* blocks) {
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) {
    return status;
  }
  if (device < kMaxDevices && (*blocks = known[device].load()) > 0) {
    return cudaSuccess;
  }
  int sms = 0;
  int per_sm = 0;
  status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess) {
    status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  }
  if (status != cudaSuccess) {
    return status;
  }
  *blocks = std::max(sms * per_sm, 1);
  if (device < kMaxDevices) {
    known[device].store(*blocks);
  }
  return cudaSuccess;
}

template <typename scalar_t, AccFormat kAcc, Power kPower, PenaltyForm kForm, ImportanceFormat kW>
cudaError_t launch(const DeviceWorkTable& table, const StepArgs& args, int64_t* counts,
                   cudaStream_t stream) {
  if (table.num_chunks == 0) {
    return cudaSuccess;
  }
  static std::atomic<int> known[kMaxDevices];
  int resident = 0;
  const cudaError_t status =
      resident_blocks(classp_step_kernel<scalar_t, kPower, kForm, kAcc, kW>, known, &resident);
  if (status != cudaSuccess) {
    return status;
  }
  // As many blocks as fit, trimmed so that every block takes the same number of chunks, or
  // one less: no last partial wave.
  const int64_t waves = (table.num_chunks + resident - 1) / resident;
  const int blocks = static_cast<int>((table.num_chunks + waves - 1) / waves);
  classp_step_kernel<scalar_t, kPower, kForm, kAcc, kW>
      <<<blocks, kThreads, 0, stream>>>(table, args, counts);
  return cudaGetLastError();
}

template <typename scalar_t, AccFormat kAcc, PenaltyForm kForm, ImportanceFormat kW>
cudaError_t launch_for_power(const DeviceWorkTable& table, const StepArgs& args,
                             int64_t* counts, cudaStream_t stream) {
  if (args.power == 1.0) {
    return launch<scalar_t, kAcc, Power::kOne, kForm, kW>(table, args, counts, stream);
  }
  if (args.power == 2.0) {
    return launch<scalar_t, kAcc, Power::kTwo, kForm, kW>(table, args, counts, stream);
  }
  return launch<scalar_t, kAcc, Power::kGeneric, kForm, kW>(table, args, counts, stream);
}

// The importance formats of scalar_t params: their dtype; bfloat16 for float and half params;
// 8-bit codes for all but double ones.
template <typename scalar_t, AccFormat kAcc, PenaltyForm kForm>
cudaError_t launch_for_importance(ImportanceFormat importance, const DeviceWorkTable& table,
                                  const StepArgs& args, int64_t* counts, cudaStream_t stream) {
  switch (importance) {
    case ImportanceFormat::kParam:
      return launch_for_power<scalar_t, kAcc, kForm, ImportanceFormat::kParam>(table, args,
                                                                              counts, stream);
    case ImportanceFormat::kBFloat16:
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::Half>) {
        return launch_for_power<scalar_t, kAcc, kForm, ImportanceFormat::kBFloat16>(
            table, args, counts, stream);
      }
      break;
    case ImportanceFormat::kCode8:
      if constexpr (!std::is_same_v<scalar_t, double>) {
        return launch_for_power<scalar_t, kAcc, kForm, ImportanceFormat::kCode8>(table, args,
                                                                                counts, stream);
      }
      break;
  }
  return cudaErrorInvalidValue;
}

template <typename scalar_t, AccFormat kAcc>
cudaError_t launch_for_form(PenaltyForm form, ImportanceFormat importance,
                            const DeviceWorkTable& table, const StepArgs& args, int64_t* counts,
                            cudaStream_t stream) {
  switch (form) {
    case PenaltyForm::kNone:
      return launch_for_power<scalar_t, kAcc, PenaltyForm::kNone, ImportanceFormat::kParam>(
          table, args, counts, stream);
    case PenaltyForm::kExplicit:
      return launch_for_importance<scalar_t, kAcc, PenaltyForm::kExplicit>(importance, table,
                                                                           args, counts, stream);
    case PenaltyForm::kProximal:
      return launch_for_importance<scalar_t, kAcc, PenaltyForm::kProximal>(importance, table,
                                                                           args, counts, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename scalar_t>
cudaError_t launch_for_format(AccFormat format, PenaltyForm form, ImportanceFormat importance,
                              const DeviceWorkTable& table, const StepArgs& args,
                              int64_t* counts, cudaStream_t stream) {
  switch (format) {
    case AccFormat::kExact:
      return launch_for_form<scalar_t, AccFormat::kExact>(form, importance, table, args, counts,
                                                          stream);
    case AccFormat::kBFloat16:
      return launch_for_form<scalar_t, AccFormat::kBFloat16>(form, importance, table, args,
                                                             counts, stream);
    case AccFormat::kCode8:
      return launch_for_form<scalar_t, AccFormat::kCode8>(form, importance, table, args, counts,
                                                          stream);
  }
  return cudaErrorInvalidValue;
}

// Values of one write_values_kernel launch: with the other arguments under the 4 KiB limit.
constexpr int kValuesPerLaunch = 500;
struct Values {
  int64_t v[kValuesPerLaunch];
};

__global__ void write_values_kernel(const Values values, int count, int64_t* dst) {
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    dst[i] = values.v[i];
  }
}

}  // namespace

cudaError_t write_to_device(const std::vector<int64_t>& values, int64_t* dst,
                            cudaStream_t stream) {
  Values batch;
  for (size_t first = 0; first < values.size(); first += kValuesPerLaunch) {
    const int count =
        static_cast<int>(std::min<size_t>(kValuesPerLaunch, values.size() - first));
    std::copy_n(values.begin() + first, count, batch.v);
    write_values_kernel<<<1, 128, 0, stream>>>(batch, count, dst + first);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) {
      return status;
    }
  }
  return cudaSuccess;
}

cudaError_t launch_classp_step(ParamDtype dtype, AccFormat format, PenaltyForm form,
                               ImportanceFormat importance, const DeviceWorkTable& table,
                               const StepArgs& args, int64_t* counts, cudaStream_t stream) {
  switch (dtype) {
    case ParamDtype::kFloat:
      return launch_for_format<float>(format, form, importance, table, args, counts, stream);
    case ParamDtype::kBFloat16:
      return launch_for_format<c10::BFloat16>(format, form, importance, table, args, counts,
                                              stream);
    case ParamDtype::kHalf:
      return launch_for_format<c10::Half>(format, form, importance, table, args, counts,
                                          stream);
    case ParamDtype::kDouble:  // never compressed
      return format == AccFormat::kExact
                 ? launch_for_form<double, AccFormat::kExact>(form, importance, table, args,
                                                              counts, stream)
                 : cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;
}

}  // namespace classp
