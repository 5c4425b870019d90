// Vectorized (at::vec) decoding of the stored formats of classp_fused/state_formats.py, shared
// by the CPU kernels: 8-bit codes (accumulators and importances) and bfloat16 importances, each
// to its exact float32 value (state_formats.decode, importance_values).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "classp_state_formats.h"

namespace classp {

// The float32 values of the Vectorized<float>::size() 8-bit codes at `codes` in a block of
// scale `scale`: q(c) * scale, q(c) = 2**(e - 32) * (1 + m/8) (float32 bits
// (c + kCodeBias) << 20) for c = 8*e + m >= 8, c * 2**-34 below.
C10_ALWAYS_INLINE at::vec::Vectorized<float> decode_codes(const uint8_t* codes,
                                                          const at::vec::Vectorized<float>& scale) {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  static_assert(at::vec::Vectorized<uint8_t>::size() == 4 * IVec::size() &&
                IVec::size() == Vec::size());
  const IVec code =
      at::vec::convert<int32_t>(at::vec::Vectorized<uint8_t>::loadu_one_fourth(codes));
  const Vec normal = at::vec::cast<float>((code + IVec(kCodeBias)) << IVec(20));
  const Vec small = at::vec::convert_to_fp_of_same_size<float>(code) * Vec(0x1p-34f);
  return Vec::blendv(small, normal, at::vec::cast<float>(code >= IVec(8))) * scale;
}

// The float32 values of the Vectorized<float>::size() importances at `data`, stored as
// bfloat16 (widened) or as 8-bit codes (uint8_t) of a block of scale `scale`.
template <typename weight_t>
C10_ALWAYS_INLINE at::vec::Vectorized<float> load_importance(const weight_t* data, float scale) {
  static_assert(std::is_same_v<weight_t, c10::BFloat16> || std::is_same_v<weight_t, uint8_t>);
  if constexpr (std::is_same_v<weight_t, uint8_t>) {
    return decode_codes(data, at::vec::Vectorized<float>(scale));
  } else {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float(data, out);
    return out;
  }
}

}  // namespace classp
