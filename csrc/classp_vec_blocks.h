// The CPU kernels' unit of work, shared by the step (classp_cpu.cpp) and the penalty passes
// (classp_penalty_ops.cpp): the arithmetic type of a param dtype, and a block of one native
// vector of the param dtype held in vectors of that arithmetic type.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>
#include <type_traits>

namespace classp {

// fp32 arithmetic for fp32/bf16/fp16 params, fp64 for fp64 params.
template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A block is one native vector of the param dtype: one vector of the arithmetic type, two for
// bf16/fp16.
template <typename scalar_t>
constexpr int kVectors = at::vec::is_reduced_floating_point_v<scalar_t> ? 2 : 1;
template <typename scalar_t>
constexpr int64_t kBlock = kVectors<scalar_t> * at::vec::Vectorized<math_t<scalar_t>>::size();

template <typename scalar_t>
using Block = std::array<at::vec::Vectorized<math_t<scalar_t>>, kVectors<scalar_t>>;

}  // namespace classp
