// The quadratic penalty's unfused passes as CPU ops (classp_fused/regularizers/penalty.py), for
// optimizers other than CLASSP, whose step takes the penalty in its own kernel:
//
//   add_penalty_grad_: grad <- grad + factor * Omega * (theta - m) * grad_scale
//   proximal_step_:    theta <- theta + w * (m - theta), w = c / (1 + c),
//                      c = min(factor * Omega * eta, max / 2)
//
// with eta a float or a tensor per param. One pass over each tensor: at::vec arithmetic in fp32
// (fp64 for fp64 params), each written value rounded once; one at::parallel_for region over all
// (tensor, chunk) pairs, split between threads by element count (classp_plan.h; tensors with
// 8-bit importances at blocks). Omega is read in its importance format (the param's dtype,
// bfloat16, or 8-bit codes with block scales) as its exact value (state_formats.importance_values).
// Tensors whose layouts differ (or are not dense) are worked on as contiguous copies, written
// back afterwards.
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "classp_checks.h"
#include "classp_plan.h"
#include "classp_state_formats.h"
#include "classp_vec_blocks.h"
#include "classp_vec_formats.h"

namespace classp {
namespace {

using at::vec::Vectorized;

// Below this many elements per thread, fewer threads are used.
constexpr int64_t kMinElementsPerThread = 1 << 15;

// The `count` (at most kBlock) elements at `ptr` in the arithmetic type; lanes past `count` 0.
template <typename scalar_t>
C10_ALWAYS_INLINE Block<scalar_t> load(const scalar_t* ptr, int64_t count) {
  const auto packed = count == kBlock<scalar_t> ? Vectorized<scalar_t>::loadu(ptr)
                                                : Vectorized<scalar_t>::loadu(ptr, count);
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(packed);
    return {lo, hi};
  } else {
    return {packed};
  }
}

// The `count` elements at `ptr`, already of the arithmetic type, as a block of `scalar_t`.
template <typename scalar_t>
C10_ALWAYS_INLINE Block<scalar_t> load_math(const math_t<scalar_t>* ptr, int64_t count) {
  using Vec = Vectorized<math_t<scalar_t>>;
  Block<scalar_t> block;
  block.fill(Vec(math_t<scalar_t>(0)));
  for (int v = 0; v < kVectors<scalar_t>; ++v) {
    const int64_t lanes = std::min<int64_t>(count - v * Vec::size(), Vec::size());
    if (lanes == Vec::size()) {
      block[v] = Vec::loadu(ptr + v * Vec::size());
    } else if (lanes > 0) {
      block[v] = Vec::loadu(ptr + v * Vec::size(), lanes);
    }
  }
  return block;
}

// The importances of the `count` elements (at most kBlock, within one 8-bit block) from element
// `i` of a tensor stored as weight_t (the param's dtype, bfloat16, or 8-bit codes with the
// tensor's block scales `scales`), in the arithmetic type; lanes past `count` 0.
template <typename scalar_t, typename weight_t>
C10_ALWAYS_INLINE Block<scalar_t> load_weight(const weight_t* weight, const float* scales,
                                              int64_t i, int64_t count) {
  if constexpr (std::is_same_v<weight_t, scalar_t>) {
    return load(weight + i, count);
  } else {
    static_assert(std::is_same_v<math_t<scalar_t>, float>);
    constexpr int64_t kVec = Vectorized<float>::size();
    const weight_t* data = weight + i;
    weight_t padded[kBlock<scalar_t>] = {};  // zero codes and bfloat16 zeros: 0
    if (count < kBlock<scalar_t>) {
      std::copy_n(data, count, padded);
      data = padded;
    }
    float scale = 0.0f;
    if constexpr (std::is_same_v<weight_t, uint8_t>) {
      scale = scales[i / kScaleBlock];
    }
    Block<scalar_t> w;
    for (int v = 0; v < kVectors<scalar_t>; ++v) {
      w[v] = load_importance(data + v * kVec, scale);
    }
    return w;
  }
}

// Rounds a block to `scalar_t` and stores its first `count` elements at `ptr`.
template <typename scalar_t>
C10_ALWAYS_INLINE void store(scalar_t* ptr, const Block<scalar_t>& value, int64_t count) {
  Vectorized<scalar_t> packed;
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    packed = at::vec::convert_from_float<scalar_t>(value[0], value[1]);
  } else {
    packed = value[0];
  }
  if (count == kBlock<scalar_t>) {
    packed.store(ptr);
  } else {
    packed.store(ptr, count);
  }
}

// One tensor's memory, laid out alike: param, importance (of dtype `weight_dtype`, with its block
// scales where uint8), anchor, and the written gradient (add_penalty_grad_) or the step size
// tensor (proximal_step_, nullptr for a float step).
struct TensorPointers {
  void* param;
  const void* weight;
  const void* anchor;
  void* grad;
  const void* eta;
  double eta_value;  // the float step size, where `eta` is nullptr
  c10::ScalarType dtype;
  c10::ScalarType weight_dtype;
  const float* weight_scales;
};

// grad += factor * (Omega * (theta - m)) * grad_scale over [begin, end) of one tensor.
template <typename scalar_t, typename weight_t>
void add_penalty_grad_range(const TensorPointers& t, int64_t begin, int64_t end, double factor,
                            double grad_scale) {
  using T = math_t<scalar_t>;
  using Vec = Vectorized<T>;
  const auto* param = static_cast<const scalar_t*>(t.param);
  const auto* weight = static_cast<const weight_t*>(t.weight);
  const auto* anchor = static_cast<const scalar_t*>(t.anchor);
  auto* grad = static_cast<scalar_t*>(t.grad);
  const Vec k(static_cast<T>(factor));
  const Vec s(static_cast<T>(grad_scale));
  for (int64_t i = begin; i < end; i += kBlock<scalar_t>) {
    const int64_t count = std::min(kBlock<scalar_t>, end - i);
    const Block<scalar_t> p = load(param + i, count);
    const Block<scalar_t> w = load_weight<scalar_t>(weight, t.weight_scales, i, count);
    const Block<scalar_t> m = load(anchor + i, count);
    Block<scalar_t> g = load(grad + i, count);
    for (int v = 0; v < kVectors<scalar_t>; ++v) {
      g[v] = g[v] + k * (w[v] * (p[v] - m[v])) * s;
    }
    store(grad + i, g, count);
  }
}

// theta += c / (1 + c) * (m - theta), c = min(factor * Omega * eta, max / 2), over [begin, end)
// of one tensor; eta from the step size tensor (kTensorStep) or the float.
template <typename scalar_t, typename weight_t, bool kTensorStep>
void proximal_step_range(const TensorPointers& t, int64_t begin, int64_t end, double factor) {
  using T = math_t<scalar_t>;
  using Vec = Vectorized<T>;
  auto* param = static_cast<scalar_t*>(t.param);
  const auto* weight = static_cast<const weight_t*>(t.weight);
  const auto* anchor = static_cast<const scalar_t*>(t.anchor);
  const auto* eta = static_cast<const T*>(t.eta);
  const Vec k(static_cast<T>(factor));
  const Vec cap(std::numeric_limits<T>::max() / 2);
  const Vec one(T(1));
  Block<scalar_t> step;
  step.fill(Vec(static_cast<T>(t.eta_value)));
  for (int64_t i = begin; i < end; i += kBlock<scalar_t>) {
    const int64_t count = std::min(kBlock<scalar_t>, end - i);
    Block<scalar_t> p = load(param + i, count);
    const Block<scalar_t> w = load_weight<scalar_t>(weight, t.weight_scales, i, count);
    const Block<scalar_t> m = load(anchor + i, count);
    if constexpr (kTensorStep) {
      step = load_math<scalar_t>(eta + i, count);
    }
    for (int v = 0; v < kVectors<scalar_t>; ++v) {
      Vec c = k * w[v] * step[v];
      c = Vec::blendv(c, cap, c > cap);  // a NaN c stays NaN, as clamp_max keeps it
      p[v] = p[v] + c / (one + c) * (m[v] - p[v]);
    }
    store(param + i, p, count);
  }
}

// Which op's pass a chunk takes.
enum class Pass { kGrad, kProximal };

// The pass over one chunk, for the tensor's dtype and its importance's.
template <Pass kPass, typename scalar_t, typename weight_t>
void run_chunk_with(const TensorPointers& t, const Chunk& chunk, double factor,
                    double grad_scale) {
  if constexpr (kPass == Pass::kGrad) {
    add_penalty_grad_range<scalar_t, weight_t>(t, chunk.begin, chunk.end, factor, grad_scale);
  } else if (t.eta != nullptr) {
    proximal_step_range<scalar_t, weight_t, true>(t, chunk.begin, chunk.end, factor);
  } else {
    proximal_step_range<scalar_t, weight_t, false>(t, chunk.begin, chunk.end, factor);
  }
}

// The importance formats: the param's dtype, bfloat16 (float32 and float16 params), 8-bit codes
// (params but float64; a chunk starts at a block).
template <Pass kPass, typename scalar_t>
void run_chunk_as(const TensorPointers& t, const Chunk& chunk, double factor, double grad_scale) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (t.weight_dtype == c10::kByte) {
      TORCH_INTERNAL_ASSERT(chunk.begin % kScaleBlock == 0);
      return run_chunk_with<kPass, scalar_t, uint8_t>(t, chunk, factor, grad_scale);
    }
    if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) {
      if (t.weight_dtype == c10::kBFloat16) {
        return run_chunk_with<kPass, scalar_t, c10::BFloat16>(t, chunk, factor, grad_scale);
      }
    }
  }
  run_chunk_with<kPass, scalar_t, scalar_t>(t, chunk, factor, grad_scale);
}

template <Pass kPass>
void run_chunk(const TensorPointers& t, const Chunk& chunk, double factor, double grad_scale) {
  switch (t.dtype) {
    case c10::kFloat:
      return run_chunk_as<kPass, float>(t, chunk, factor, grad_scale);
    case c10::kBFloat16:
      return run_chunk_as<kPass, c10::BFloat16>(t, chunk, factor, grad_scale);
    case c10::kHalf:
      return run_chunk_as<kPass, c10::Half>(t, chunk, factor, grad_scale);
    case c10::kDouble:
      return run_chunk_as<kPass, double>(t, chunk, factor, grad_scale);
    default:
      TORCH_CHECK(false, "classp_fused penalty ops: unsupported dtype ", t.dtype);
  }
}

// The tensors of one param as the kernel reads them: as given where they share one dense layout,
// else contiguous copies; `written` (the param or the gradient) is copied back after the pass.
struct Operands {
  std::vector<at::Tensor> tensors;  // param, importance, anchor, then grad or step tensor
  at::Tensor written;               // the caller's tensor the pass writes
  int64_t written_index;            // its position in `tensors`
};

Operands lay_out(std::vector<at::Tensor> tensors, int64_t written_index) {
  const at::Tensor& first = tensors[0];
  bool direct = first.is_non_overlapping_and_dense();
  for (const at::Tensor& t : tensors) {
    direct = direct && t.strides() == first.strides();
  }
  at::Tensor written = tensors[written_index];
  if (!direct) {
    for (at::Tensor& t : tensors) {
      t = t.contiguous();
    }
  }
  return {std::move(tensors), std::move(written), written_index};
}

// TORCH_CHECKs one param's tensors for op `op`: the param of one of the four dtypes on the CPU,
// its importance of an importance format (classp_checks.h), each other `name`[i] of its dtype;
// all defined, dense, of its shape and device.
void check_like_param(const char* op, size_t i, const at::Tensor& param,
                      const at::Tensor& importance,
                      std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  TORCH_CHECK(param.defined() && param.layout() == c10::kStrided, op, ": params[", i,
              "] must be a dense (strided) tensor");
  const auto dtype = param.scalar_type();
  TORCH_CHECK(dtype == c10::kFloat || dtype == c10::kBFloat16 || dtype == c10::kHalf ||
                  dtype == c10::kDouble,
              op, ": params[", i, "] must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(param.device().is_cpu(), op, ": params[", i, "] is on ", param.device(),
              ", expected the CPU");
  std::vector<std::pair<const char*, const at::Tensor*>> tensors{{"importances", &importance}};
  tensors.insert(tensors.end(), others);
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->defined() && t->layout() == c10::kStrided, op, ": ", name, "[", i,
                "] must be a dense (strided) tensor");
    const bool weight = t == &importance;
    TORCH_CHECK(weight ? is_importance_format(dtype, t->scalar_type())
                       : t->scalar_type() == dtype,
                op, ": ", name, "[", i, "] has dtype ", t->scalar_type(),
                weight ? ", expected an importance format of the param's "
                       : ", expected the param's ",
                dtype, weight ? " (its dtype, bfloat16, or uint8 8-bit codes)" : "");
    TORCH_CHECK(t->sizes() == param.sizes(), op, ": ", name, "[", i, "] has shape ", t->sizes(),
                ", expected the param's ", param.sizes());
    TORCH_CHECK(t->device() == param.device(), op, ": ", name, "[", i, "] is on ", t->device(),
                ", expected the param's device ", param.device());
  }
}

// Runs `kPass` over every tensor of `operands` in one parallel region, then copies the written
// tensors that were worked on as copies back to the caller's.
template <Pass kPass>
void run(const std::vector<Operands>& operands, const std::vector<TensorPointers>& pointers,
         double factor, double grad_scale) {
  std::vector<int64_t> numels;
  std::vector<int64_t> alignments;  // tensors with 8-bit importances are cut at blocks
  numels.reserve(operands.size());
  alignments.reserve(operands.size());
  int64_t total = 0;
  for (size_t i = 0; i < operands.size(); ++i) {
    numels.push_back(operands[i].tensors[0].numel());
    alignments.push_back(pointers[i].weight_dtype == c10::kByte ? kScaleBlock : 1);
    total += numels.back();
  }
  const int64_t num_parts =
      std::clamp<int64_t>(total / kMinElementsPerThread, 1, at::get_num_threads());
  const Plan plan = plan_work(numels, num_parts, alignments);
  at::parallel_for(0, num_parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t i = plan.part_starts[part_begin]; i < plan.part_starts[part_end]; ++i) {
      const Chunk& chunk = plan.chunks[i];
      run_chunk<kPass>(pointers[chunk.tensor], chunk, factor, grad_scale);
    }
  });
  for (const Operands& o : operands) {
    const at::Tensor& work = o.tensors[o.written_index];
    if (!work.is_same(o.written)) {
      o.written.copy_(work);
    }
  }
}

void check_lengths(const char* op, at::TensorList params, at::TensorList importances,
                   at::TensorList anchors, size_t others, const char* others_name) {
  TORCH_CHECK(importances.size() == params.size() && anchors.size() == params.size() &&
                  others == params.size(),
              op, ": params, importances, anchors and ", others_name,
              " must have the same length, got ", params.size(), ", ", importances.size(), ", ",
              anchors.size(), " and ", others);
}

// TORCH_CHECKs the block scales of the uint8 importances (classp_checks.h).
void check_scales(const char* op, at::TensorList params, at::TensorList importances,
                  at::TensorList importance_scales) {
  std::vector<const at::Tensor*> weights;
  weights.reserve(importances.size());
  for (const at::Tensor& weight : importances) {
    weights.push_back(&weight);
  }
  check_importance_scales(op, params, weights, importance_scales);
}

// The block scales of each uint8 importance (in order, from `importance_scales`), else nullptr.
std::vector<const float*> scales_of(at::TensorList importances,
                                    at::TensorList importance_scales) {
  std::vector<const float*> scales;
  scales.reserve(importances.size());
  size_t next = 0;
  for (const at::Tensor& weight : importances) {
    scales.push_back(weight.scalar_type() == c10::kByte
                         ? importance_scales[next++].const_data_ptr<float>()
                         : nullptr);
  }
  return scales;
}

void check_no_internal_overlap(const char* op, const char* name, size_t i, const at::Tensor& t) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name, "[", i,
              "] must not have internal overlap (e.g. from expand())");
}

void add_penalty_grad_cpu(at::TensorList params, at::TensorList importances,
                          at::TensorList importance_scales, at::TensorList anchors,
                          at::TensorList grads, double factor,
                          const std::optional<at::Tensor>& grad_scale) {
  constexpr const char* op = "add_penalty_grad_";
  check_lengths(op, params, importances, anchors, grads.size(), "grads");
  TORCH_CHECK(!grad_scale.has_value() || grad_scale->numel() == 1, op,
              ": grad_scale must hold one element, got ", grad_scale->numel());
  for (size_t i = 0; i < params.size(); ++i) {
    check_like_param(op, i, params[i], importances[i],
                     {{"anchors", &anchors[i]}, {"grads", &grads[i]}});
    check_no_internal_overlap(op, "grads", i, grads[i]);
  }
  check_scales(op, params, importances, importance_scales);
  const std::vector<const float*> scales = scales_of(importances, importance_scales);
  const double scale = grad_scale.has_value() ? grad_scale->item<double>() : 1.0;
  std::vector<Operands> operands;
  std::vector<TensorPointers> pointers;
  operands.reserve(params.size());
  pointers.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    operands.push_back(lay_out({params[i], importances[i], anchors[i], grads[i]}, 3));
    const auto& t = operands.back().tensors;
    pointers.push_back({t[0].data_ptr(), t[1].const_data_ptr(), t[2].const_data_ptr(),
                        t[3].mutable_data_ptr(), nullptr, 0.0, params[i].scalar_type(),
                        importances[i].scalar_type(), scales[i]});
  }
  run<Pass::kGrad>(operands, pointers, factor, scale);
}

void proximal_step_cpu(at::TensorList params, at::TensorList importances,
                       at::TensorList importance_scales, at::TensorList anchors,
                       const c10::List<std::optional<at::Tensor>>& step_tensors,
                       c10::ArrayRef<double> step_values, double factor) {
  constexpr const char* op = "proximal_step_";
  check_lengths(op, params, importances, anchors, step_values.size(), "step_values");
  TORCH_CHECK(step_tensors.empty() || step_tensors.size() == params.size(), op,
              ": step_tensors must be empty or have one entry per param (", params.size(),
              "), got ", step_tensors.size());
  std::vector<std::optional<at::Tensor>> steps(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_like_param(op, i, params[i], importances[i], {{"anchors", &anchors[i]}});
    check_no_internal_overlap(op, "params", i, params[i]);
    if (!step_tensors.empty()) {
      steps[i] = step_tensors.get(i);
    }
    if (steps[i].has_value()) {
      const at::Tensor& step = *steps[i];
      TORCH_CHECK(step.defined() && at::isFloatingType(step.scalar_type()), op,
                  ": step_tensors[", i, "] must be a floating-point tensor");
      TORCH_CHECK(step.device() == params[i].device(), op, ": step_tensors[", i, "] is on ",
                  step.device(), ", expected the param's device ", params[i].device());
      TORCH_CHECK(at::is_expandable_to(step.sizes(), params[i].sizes()), op, ": step_tensors[",
                  i, "] of shape ", step.sizes(), " does not broadcast to the param's ",
                  params[i].sizes());
    }
  }
  check_scales(op, params, importances, importance_scales);
  const std::vector<const float*> scales = scales_of(importances, importance_scales);
  std::vector<Operands> operands;
  std::vector<TensorPointers> pointers;
  operands.reserve(params.size());
  pointers.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<at::Tensor> tensors{params[i], importances[i], anchors[i]};
    double eta_value = step_values[i];
    if (steps[i].has_value() && steps[i]->numel() == 1) {
      eta_value = steps[i]->item<double>();  // one value for every element
    } else if (steps[i].has_value()) {
      tensors.push_back(steps[i]->to(compute_dtype(params[i].scalar_type()))
                            .expand(params[i].sizes()));
    }
    operands.push_back(lay_out(std::move(tensors), 0));
    const auto& t = operands.back().tensors;
    pointers.push_back({t[0].data_ptr(), t[1].const_data_ptr(), t[2].const_data_ptr(),
                        nullptr, t.size() > 3 ? t[3].const_data_ptr() : nullptr, eta_value,
                        params[i].scalar_type(), importances[i].scalar_type(), scales[i]});
  }
  run<Pass::kProximal>(operands, pointers, factor, 1.0);
}

}  // namespace
}  // namespace classp

TORCH_LIBRARY_FRAGMENT(classp_fused, m) {
  m.def(
      "add_penalty_grad_(Tensor[] params, Tensor[] importances, Tensor[] importance_scales, "
      "Tensor[] anchors, "
      "Tensor(a!)[] grads, float factor, Tensor? grad_scale) -> ()");
  m.def(
      "proximal_step_(Tensor(a!)[] params, Tensor[] importances, Tensor[] importance_scales, "
      "Tensor[] anchors, "
      "Tensor?[] step_tensors, float[] step_values, float factor) -> ()");
}

TORCH_LIBRARY_IMPL(classp_fused, CPU, m) {
  m.impl("add_penalty_grad_", &classp::add_penalty_grad_cpu);
  m.impl("proximal_step_", &classp::proximal_step_cpu);
}
