// The classp_fused op library: the schema of classp_fused::classp_step_ and its CPU kernel
// (classp_module.cpp makes the Python module classp_fused._C; importing it registers the ops).
//
// CPU kernel: one at::parallel_for region over all (tensor, chunk) pairs, split between threads
// by element count; at::vec arithmetic in fp32 (fp64 for fp64 params), the parameter rounded
// once on write. Blocks where no element is selected are not written at all; partly selected
// blocks keep the old bits of unselected elements by a bitwise blend.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "classp_checks.h"
#include "classp_plan.h"

namespace classp {
namespace {

using at::vec::Vectorized;

// Below this many elements per thread, fewer threads are used.
constexpr int64_t kMinElementsPerThread = 1 << 15;
// Software prefetch distance: with the mask and count work per element, the out-of-order window
// alone keeps too few cache misses in flight (measured 20% slower than fused Adagrad without).
constexpr int64_t kPrefetchElements = 1024;

enum class Power { kOne, kTwo, kGeneric };

// fp32 arithmetic for fp32/bf16/fp16 params, fp64 for fp64 params.
template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The step's scalars in the arithmetic type, rounded as the reference rounds them.
template <typename T>
struct Hyper {
  T lr, threshold, eps, power, inv_power, grad_scale;
  bool apply_scaling, has_grad_scale;
};

template <typename T>
Hyper<T> make_hyper(double lr, double threshold, double eps, double power, bool apply_scaling,
                    std::optional<double> grad_scale) {
  return {static_cast<T>(lr), static_cast<T>(threshold), static_cast<T>(eps),
          static_cast<T>(power), static_cast<T>(1.0 / power),
          static_cast<T>(grad_scale.value_or(1.0)), apply_scaling, grad_scale.has_value()};
}

// Element counts of one work item.
struct Tally {
  int64_t updated = 0;
  int64_t nonfinite = 0;
};

// The gradient as the update sees it: divided by grad_scale when there is one.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> scaled(const Vectorized<T>& grad, const Hyper<T>& h) {
  return h.has_grad_scale ? grad / Vectorized<T>(h.grad_scale) : grad;
}

// The CLASSP update of one vector: new values, and `selected` as a lane mask (all bits set or
// clear). `probe` accumulates grad - grad: zero while every gradient is finite, NaN after any
// that is not (counted afterwards, in the rare ranges that have one).
template <Power kPower, typename T>
C10_ALWAYS_INLINE void update_vector(const Vectorized<T>& param, const Vectorized<T>& raw_grad,
                                     const Vectorized<T>& acc, const Hyper<T>& h,
                                     Vectorized<T>& new_param, Vectorized<T>& new_acc,
                                     Vectorized<T>& selected, Vectorized<T>& probe) {
  using Vec = Vectorized<T>;
  const Vec grad = scaled(raw_grad, h);
  const Vec square = grad * grad;
  const Vec nan_unless_finite = grad - grad;
  probe = probe + nan_unless_finite;
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
  if (h.apply_scaling) {
    const Vec denom = Vec(h.eps) + new_acc;
    if constexpr (kPower == Power::kOne) {
      step = grad / denom;
    } else if constexpr (kPower == Power::kTwo) {
      step = grad * denom.rsqrt();
    } else {
      step = grad * (denom.log2() * Vec(-h.inv_power)).exp2();
    }
  }
  new_param = param - Vec(h.lr) * step;
}

// A block is one native vector of the param dtype: one vector of the arithmetic type, two for
// bf16/fp16.
template <typename scalar_t>
constexpr int kVectors = at::vec::is_reduced_floating_point_v<scalar_t> ? 2 : 1;
template <typename scalar_t>
constexpr int64_t kBlock = kVectors<scalar_t> * Vectorized<math_t<scalar_t>>::size();

template <typename scalar_t>
using Block = std::array<Vectorized<math_t<scalar_t>>, kVectors<scalar_t>>;

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

// Stores a block of new parameter values; where `selected` is clear the old bits stay (also NaN
// payloads, which a round trip through fp32 would not keep for bf16/fp16).
template <typename scalar_t>
C10_ALWAYS_INLINE void store_param_block(scalar_t* ptr, const Block<scalar_t>& old_value,
                                         const Block<scalar_t>& value,
                                         const Block<scalar_t>& selected, bool blend) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    auto packed = at::vec::convert_from_float<scalar_t>(value[0], value[1]);
    if (blend) {
      const auto mask = at::vec::VecMask<float, 2>(
                            at::vec::VectorizedN<float, 2>(selected[0], selected[1]))
                            .template cast<scalar_t, 1>();
      packed = Vectorized<scalar_t>::blendv(Vectorized<scalar_t>::loadu(ptr), packed,
                                            Vectorized<scalar_t>(mask));
    }
    packed.store(ptr);
  } else {
    (blend ? Vectorized<scalar_t>::blendv(old_value[0], value[0], selected[0]) : value[0])
        .store(ptr);
  }
}

// Updates kBlock<scalar_t> elements; returns how many were selected.
template <Power kPower, typename scalar_t>
C10_ALWAYS_INLINE int step_block(scalar_t* param, const scalar_t* grad, math_t<scalar_t>* acc,
                                 const Hyper<math_t<scalar_t>>& h,
                                 Vectorized<math_t<scalar_t>>& probe) {
  using Vec = Vectorized<math_t<scalar_t>>;
  constexpr int kVec = Vec::size();
  constexpr int kAllLanes = (1 << kVec) - 1;
  const Block<scalar_t> p = load_block(param);
  const Block<scalar_t> g = load_block(grad);
  Block<scalar_t> a, new_p, new_a, selected;
  int unselected = 0;  // count of unselected lanes
  bool any_selected = false;
  bool all_selected = true;
  for (int v = 0; v < kVectors<scalar_t>; ++v) {
    a[v] = Vec::loadu(acc + v * kVec);
    update_vector<kPower>(p[v], g[v], a[v], h, new_p[v], new_a[v], selected[v], probe);
    const int unselected_lanes = selected[v].zero_mask();
    any_selected |= unselected_lanes != kAllLanes;
    all_selected &= unselected_lanes == 0;
    unselected += __builtin_popcount(unselected_lanes);
  }
  if (!any_selected) {
    return 0;  // no writes
  }
  for (int v = 0; v < kVectors<scalar_t>; ++v) {
    (all_selected ? new_a[v] : Vec::blendv(a[v], new_a[v], selected[v])).store(acc + v * kVec);
  }
  store_param_block(param, p, new_p, selected, !all_selected);
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

// Prefetches the block kPrefetchElements ahead.
template <typename scalar_t>
C10_ALWAYS_INLINE void prefetch_block(const scalar_t* param, const scalar_t* grad,
                                      const math_t<scalar_t>* acc) {
  prefetch_lines<1>(param + kPrefetchElements, kBlock<scalar_t>);
  prefetch_lines<0>(grad + kPrefetchElements, kBlock<scalar_t>);
  prefetch_lines<1>(acc + kPrefetchElements, kBlock<scalar_t>);
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

// Updates elements [0, n) of one tensor: whole blocks in place, the tail on zero-padded copies
// (a zero gradient is never selected since threshold >= 0), copied back only if selected.
// `h` is a copy so that stores through `param` and `acc` cannot alias it.
template <Power kPower, typename scalar_t>
Tally step_range(scalar_t* param, const scalar_t* grad, math_t<scalar_t>* acc, int64_t n,
                 const Hyper<math_t<scalar_t>> h) {
  using T = math_t<scalar_t>;
  constexpr int64_t kSize = kBlock<scalar_t>;
  Tally tally;
  Vectorized<T> probe(T(0));
  int64_t i = 0;
  for (; i + kSize <= n - kPrefetchElements; i += kSize) {
    prefetch_block(param + i, grad + i, acc + i);
    tally.updated += step_block<kPower>(param + i, grad + i, acc + i, h, probe);
  }
  for (; i + kSize <= n; i += kSize) {
    tally.updated += step_block<kPower>(param + i, grad + i, acc + i, h, probe);
  }
  const int64_t rest = n - i;
  if (rest > 0) {
    scalar_t param_tail[kSize] = {};
    scalar_t grad_tail[kSize] = {};
    T acc_tail[kSize] = {};
    std::copy_n(param + i, rest, param_tail);
    std::copy_n(grad + i, rest, grad_tail);
    std::copy_n(acc + i, rest, acc_tail);
    const int updated = step_block<kPower>(param_tail, grad_tail, acc_tail, h, probe);
    if (updated > 0) {
      tally.updated += updated;
      std::copy_n(param_tail, rest, param + i);
      std::copy_n(acc_tail, rest, acc + i);
    }
  }
  if (probe.zero_mask() != (1 << Vectorized<T>::size()) - 1) {
    tally.nonfinite = count_nonfinite(grad, n, h);
  }
  return tally;
}

// One tensor triple's memory, laid out alike (contiguous, or dense with equal strides).
struct TensorPointers {
  void* param;
  const void* grad;
  void* acc;
  c10::ScalarType dtype;
};

template <Power kPower>
Tally step_chunk(const TensorPointers& t, const Chunk& chunk, const Hyper<float>& hf,
                 const Hyper<double>& hd) {
  const int64_t n = chunk.end - chunk.begin;
  switch (t.dtype) {
    case c10::kFloat:
      return step_range<kPower>(static_cast<float*>(t.param) + chunk.begin,
                                static_cast<const float*>(t.grad) + chunk.begin,
                                static_cast<float*>(t.acc) + chunk.begin, n, hf);
    case c10::kBFloat16:
      return step_range<kPower>(static_cast<c10::BFloat16*>(t.param) + chunk.begin,
                                static_cast<const c10::BFloat16*>(t.grad) + chunk.begin,
                                static_cast<float*>(t.acc) + chunk.begin, n, hf);
    case c10::kHalf:
      return step_range<kPower>(static_cast<c10::Half*>(t.param) + chunk.begin,
                                static_cast<const c10::Half*>(t.grad) + chunk.begin,
                                static_cast<float*>(t.acc) + chunk.begin, n, hf);
    case c10::kDouble:
      return step_range<kPower>(static_cast<double*>(t.param) + chunk.begin,
                                static_cast<const double*>(t.grad) + chunk.begin,
                                static_cast<double*>(t.acc) + chunk.begin, n, hd);
    default:
      TORCH_CHECK(false, "classp_step_: unsupported dtype ", t.dtype);
  }
}

template <Power kPower>
void run_plan(const std::vector<TensorPointers>& tensors, const Plan& plan, const Hyper<float>& hf,
              const Hyper<double>& hd, std::vector<Tally>& tallies) {
  const int64_t num_parts = static_cast<int64_t>(plan.part_starts.size()) - 1;
  at::parallel_for(0, num_parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t i = plan.part_starts[part_begin]; i < plan.part_starts[part_end]; ++i) {
      const Chunk& chunk = plan.chunks[i];
      tallies[i] = step_chunk<kPower>(tensors[chunk.tensor], chunk, hf, hd);
    }
  });
}

// Whether the kernel can work on the tensors' memory directly: equal strides, no gaps.
bool same_dense_layout(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& acc) {
  return param.is_non_overlapping_and_dense() && grad.strides() == param.strides() &&
         acc.strides() == param.strides();
}

at::Tensor classp_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList accs,
                           const at::Tensor& lr, double threshold, double eps, double power,
                           bool apply_scaling, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf) {
  check_step_inputs(params, grads, accs, lr, threshold, eps, power, grad_scale, found_inf,
                    c10::Device(c10::kCPU));
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor counts = at::zeros({n, 2}, at::TensorOptions().dtype(at::kLong));
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) {
    return counts;  // an overflowed AMP step changes and counts nothing
  }
  const double lr_value = lr.item<double>();
  const std::optional<double> scale =
      grad_scale.has_value() ? std::optional<double>(grad_scale->item<double>()) : std::nullopt;
  const auto hf = make_hyper<float>(lr_value, threshold, eps, power, apply_scaling, scale);
  const auto hd = make_hyper<double>(lr_value, threshold, eps, power, apply_scaling, scale);

  // Tensors laid out differently are updated on contiguous copies, written back afterwards.
  std::vector<at::Tensor> work_params(n), work_grads(n), work_accs(n);
  std::vector<TensorPointers> tensors(n);
  std::vector<int64_t> numels(n);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool direct = same_dense_layout(params[i], grads[i], accs[i]);
    work_params[i] = direct ? params[i] : params[i].contiguous();
    work_grads[i] = direct ? grads[i] : grads[i].contiguous();
    work_accs[i] = direct ? accs[i] : accs[i].contiguous();
    numels[i] = params[i].numel();
    total += numels[i];
    tensors[i] = {work_params[i].data_ptr(), work_grads[i].data_ptr(), work_accs[i].data_ptr(),
                  params[i].scalar_type()};
  }

  const int64_t num_parts =
      std::clamp<int64_t>(total / kMinElementsPerThread, 1, at::get_num_threads());
  const Plan plan = plan_work(numels, num_parts);
  std::vector<Tally> tallies(plan.chunks.size());
  if (power == 1.0) {
    run_plan<Power::kOne>(tensors, plan, hf, hd, tallies);
  } else if (power == 2.0) {
    run_plan<Power::kTwo>(tensors, plan, hf, hd, tallies);
  } else {
    run_plan<Power::kGeneric>(tensors, plan, hf, hd, tallies);
  }

  auto counts_data = counts.accessor<int64_t, 2>();
  for (size_t i = 0; i < plan.chunks.size(); ++i) {
    counts_data[plan.chunks[i].tensor][0] += tallies[i].updated;
    counts_data[plan.chunks[i].tensor][1] += tallies[i].nonfinite;
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

// The work split of a step over tensors of `numels` elements among `num_parts` threads: the
// (chunks, 3) int64 table of [tensor, begin, end] rows and the first chunk of each part (ending
// with the number of chunks); and the CUDA kernel's work table over the non-empty tensors, with
// addresses 0 and each tensor's index as its row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_plan(c10::IntArrayRef numels,
                                                          int64_t num_parts) {
  TORCH_CHECK(num_parts > 0, "_chunk_plan: num_parts must be positive");
  const Plan plan = plan_work(numels.vec(), num_parts);
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
      records.push_back({0, 0, 0, numels[i], i});
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
      "Tensor? found_inf) -> Tensor");
  m.def("_chunk_plan(int[] numels, int num_parts) -> (Tensor, Tensor, Tensor)",
        &classp::chunk_plan);
}

TORCH_LIBRARY_IMPL(classp_fused, CPU, m) {
  m.impl("classp_step_", &classp::classp_step_cpu);
}
