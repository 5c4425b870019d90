// The compressed accumulator formats of classp_fused/state_formats.py in scalar C++, for the
// kernels: the counter-based random bits, bfloat16 stochastic rounding, and the constants and
// block scale of the 8-bit codes (a uint8 code per element, a power-of-two float32 scale per
// kScaleBlock elements). Every function computes what its Python namesake does, bit for bit.
// Plain C++, no ATen.
#pragma once

#include <bit>
#include <cstdint>

namespace classp {

// Elements per 8-bit block (one scale), in the row-major order of the param's local tensor.
constexpr int64_t kScaleBlock = 256;
// The largest value an 8-bit code holds: 15/16 * 2**127 (the top code at scale 2**127).
constexpr float kSaturation = 0x1.ep+126f;
// float32 bits >> 20 of q(8*e + m) are (e + 95) << 3 | m.
constexpr int32_t kCodeBias = (127 - 32) << 3;

// The number of 8-bit blocks (scales) of a tensor of `numel` elements.
constexpr int64_t num_blocks(int64_t numel) {
  return (numel + kScaleBlock - 1) / kScaleBlock;
}

// lowbias32.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// The 32 random bits of elements [first, first + count) of a tensor with rounding `key`:
// element_bits(key, i) = mix32((i mod 2**32) ^ mix32(key + (i >> 32))).
inline void element_bits(uint32_t key, uint64_t first, int64_t count, uint32_t* out) {
  const uint64_t last = first + static_cast<uint64_t>(count) - 1;
  if (count > 0 && (first >> 32) == (last >> 32)) {  // one mix of the key for all
    const uint32_t high = mix32(key + static_cast<uint32_t>(first >> 32));
    const uint32_t low = static_cast<uint32_t>(first);
    for (uint32_t k = 0; k < static_cast<uint32_t>(count); ++k) {  // 32-bit lanes throughout
      out[k] = mix32((low + k) ^ high);
    }
    return;
  }
  for (int64_t k = 0; k < count; ++k) {
    const uint64_t i = first + static_cast<uint64_t>(k);
    out[k] = mix32(static_cast<uint32_t>(i) ^ mix32(key + static_cast<uint32_t>(i >> 32)));
  }
}

// The bfloat16 bits of float32 `x` rounded stochastically with `bits` (its low 16 are used).
inline uint16_t round_bf16(float x, uint32_t bits) {
  return static_cast<uint16_t>((std::bit_cast<uint32_t>(x) + (bits & 0xFFFFu)) >> 16);
}

// The scale 2**E of a block whose largest value is `top` (>= 0, at most kSaturation): E the
// smallest exponent >= -115 with top <= 15/16 * 2**E; 0 when top is 0 (or NaN).
inline float block_scale(float top) {
  if (!(top > 0.0f)) {
    return 0.0f;
  }
  const int32_t bits = std::bit_cast<int32_t>(top < 0x1p-116f ? 0x1p-116f : top);
  const int32_t exponent = (bits >> 23) - 127 + 1 + ((bits & 0x7FFFFF) > 0x700000 ? 1 : 0);
  return std::bit_cast<float>(static_cast<uint32_t>(exponent + 127) << 23);
}

}  // namespace classp
