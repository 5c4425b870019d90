// The accumulator and importance formats of a CLASSP step (classp_fused/state_formats.py),
// shared by the op's checks and the kernels. Plain C++, no ATen.
#pragma once

namespace classp {

// kExact: the compute dtype (float32, float64 for float64 params). kBFloat16: bfloat16,
// rounded stochastically. kCode8: one uint8 code per element and a float32 scale per block of
// kCodeBlock consecutive elements, rounded stochastically.
enum class AccFormat { kExact, kBFloat16, kCode8 };

// The formats of a penalty's importance W. kParam: the param's dtype. kBFloat16: bfloat16 (of
// float32 and float16 params). kCode8: the 8-bit codes and block scales of kCode8 accumulators
// (rounded to nearest). Every format is read as its exact float32 value (float64 for float64
// params, which take kParam only).
enum class ImportanceFormat { kParam, kBFloat16, kCode8 };

constexpr int kCodeBlock = 256;

}  // namespace classp
