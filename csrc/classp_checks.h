// Input checks of classp_fused::classp_step_, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "classp_formats.h"
#include "classp_penalty.h"
#include "classp_state_formats.h"

namespace classp {

// The accumulator and arithmetic dtype for a parameter dtype.
inline c10::ScalarType compute_dtype(c10::ScalarType param_dtype) {
  return param_dtype == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// The format of an accumulator of dtype `acc_dtype` (checked) for a param of `param_dtype`.
inline AccFormat acc_format(c10::ScalarType param_dtype, c10::ScalarType acc_dtype) {
  if (acc_dtype == compute_dtype(param_dtype)) {
    return AccFormat::kExact;
  }
  return acc_dtype == c10::kBFloat16 ? AccFormat::kBFloat16 : AccFormat::kCode8;
}

// Whether `acc` is a compressed accumulator of a `param_dtype` param
// (classp_fused/state_formats.py): bfloat16, or uint8 8-bit codes, of a param that is not float64.
inline bool is_compressed_acc(c10::ScalarType param_dtype, const at::Tensor& acc) {
  return param_dtype != c10::kDouble &&
         (acc.scalar_type() == c10::kBFloat16 || acc.scalar_type() == c10::kByte);
}

// TORCH_CHECKs what the op needs: the Python wrapper validates too, but the op can be called
// directly. Every tensor of the lists must live on `device`; a device of type CPU for the CPU
// kernel, the params' CUDA device for the CUDA kernel. `lr` may live on the CPU or on `device`.
// With `compressed` an accumulator may also be compressed (see check_compressed_inputs).
inline void check_step_inputs(at::TensorList params, at::TensorList grads, at::TensorList accs,
                              const at::Tensor& lr, double threshold, double eps, double power,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf,
                              const c10::Device& device, bool compressed = false) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == accs.size(),
              "classp_step_: params, grads and accs must have the same length, got ",
              params.size(), ", ", grads.size(), ", ", accs.size());
  TORCH_CHECK(lr.defined() && lr.numel() == 1 && at::isFloatingType(lr.scalar_type()),
              "classp_step_: lr must be a one-element floating-point tensor");
  TORCH_CHECK(lr.device().is_cpu() || lr.device() == device, "classp_step_: lr is on ",
              lr.device(), ", expected the CPU or the params' device ", device);
  TORCH_CHECK(threshold >= 0.0, "classp_step_: threshold must be >= 0, got ", threshold);
  TORCH_CHECK(eps >= 0.0, "classp_step_: eps must be >= 0, got ", eps);
  TORCH_CHECK(power > 0.0 && std::isfinite(power),
              "classp_step_: power must be a finite number > 0, got ", power);
  for (const auto* scalar : {&grad_scale, &found_inf}) {
    if (scalar->has_value()) {
      const at::Tensor& t = **scalar;
      const char* name = scalar == &grad_scale ? "grad_scale" : "found_inf";
      TORCH_CHECK(t.numel() == 1, "classp_step_: ", name, " must hold one element, got ",
                  t.numel());
      TORCH_CHECK(t.device() == device, "classp_step_: ", name, " is on ", t.device(),
                  ", expected the params' device ", device);
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    const at::Tensor& acc = accs[i];
    TORCH_CHECK(param.defined() && grad.defined() && acc.defined(), "classp_step_: params[", i,
                "], grads[", i, "] and accs[", i, "] must be defined tensors");
    const auto dtype = param.scalar_type();
    TORCH_CHECK(dtype == c10::kFloat || dtype == c10::kBFloat16 || dtype == c10::kHalf ||
                    dtype == c10::kDouble,
                "classp_step_: params[", i, "] must be float16, bfloat16, float32 or float64, got ",
                dtype);
    TORCH_CHECK(grad.scalar_type() == dtype, "classp_step_: grads[", i, "] has dtype ",
                grad.scalar_type(), ", expected the param's ", dtype);
    TORCH_CHECK(acc.scalar_type() == compute_dtype(dtype) ||
                    (compressed && is_compressed_acc(dtype, acc)),
                "classp_step_: accs[", i, "] has dtype ", acc.scalar_type(), ", expected ",
                compute_dtype(dtype),
                compressed && dtype != c10::kDouble ? " (or compressed: bfloat16 or uint8)" : "",
                " for a ", dtype, " param");
    TORCH_CHECK(param.layout() == c10::kStrided && grad.layout() == c10::kStrided &&
                    acc.layout() == c10::kStrided,
                "classp_step_: params[", i, "], grads[", i, "] and accs[", i,
                "] must be dense (strided) tensors");
    TORCH_CHECK(grad.sizes() == param.sizes(), "classp_step_: grads[", i, "] has shape ",
                grad.sizes(), ", expected the param's ", param.sizes());
    TORCH_CHECK(acc.sizes() == param.sizes(), "classp_step_: accs[", i, "] has shape ",
                acc.sizes(), ", expected the param's ", param.sizes());
    TORCH_CHECK(param.device() == device, "classp_step_: params[", i, "] is on ", param.device(),
                ", expected ", device);
    TORCH_CHECK(grad.device() == device, "classp_step_: grads[", i, "] is on ", grad.device(),
                ", expected the param's device ", device);
    TORCH_CHECK(acc.device() == device, "classp_step_: accs[", i, "] is on ", acc.device(),
                ", expected the param's device ", device);
    TORCH_CHECK(at::has_internal_overlap(param) != at::MemOverlap::Yes &&
                    at::has_internal_overlap(acc) != at::MemOverlap::Yes,
                "classp_step_: params[", i, "] and accs[", i,
                "] must not have internal overlap (e.g. from expand())");
  }
}

// Whether `importance_dtype` is an importance format of a `param_dtype` param
// (classp_fused/state_formats.py): the param's dtype, bfloat16 for float32 and float16 params,
// uint8 (8-bit codes) for params that are not float64.
inline bool is_importance_format(c10::ScalarType param_dtype, c10::ScalarType importance_dtype) {
  return importance_dtype == param_dtype ||
         (importance_dtype == c10::kBFloat16 &&
          (param_dtype == c10::kFloat || param_dtype == c10::kHalf)) ||
         (importance_dtype == c10::kByte && param_dtype != c10::kDouble);
}

// TORCH_CHECKs the block scales of the uint8 importances: `importance_scales` holds, in order,
// one contiguous float32 tensor of one scale per kScaleBlock elements for each, on its device.
inline void check_importance_scales(const char* op, at::TensorList params,
                                    const std::vector<const at::Tensor*>& importances,
                                    at::TensorList importance_scales) {
  size_t num_codes = 0;
  for (size_t i = 0; i < importances.size(); ++i) {
    const at::Tensor* weight = importances[i];
    if (weight == nullptr || weight->scalar_type() != c10::kByte) {
      continue;
    }
    TORCH_CHECK(weight->is_contiguous(), op, ": importances[", i,
                "] (uint8 8-bit codes) must be contiguous");
    TORCH_CHECK(num_codes < importance_scales.size(), op, ": importance_scales has ",
                importance_scales.size(), " tensors, but importances[", i,
                "] is uint8 importance number ", num_codes + 1,
                " (one scales tensor per uint8 (8-bit) importance, in order)");
    const at::Tensor& scales = importance_scales[num_codes];
    const int64_t blocks = num_blocks(params[i].numel());
    TORCH_CHECK(scales.defined() && scales.scalar_type() == c10::kFloat && scales.dim() == 1 &&
                    scales.numel() == blocks && scales.is_contiguous(),
                op, ": importance_scales[", num_codes, "] (of importances[", i,
                "]) must be a contiguous float32 tensor of shape (", blocks,
                ",) (one scale per ", kScaleBlock, " elements), got ",
                scales.defined() ? scales.toString() + " of shape " + c10::str(scales.sizes())
                                 : std::string("an undefined tensor"));
    TORCH_CHECK(scales.device() == params[i].device(), op, ": importance_scales[", num_codes,
                "] is on ", scales.device(), ", expected the param's device ",
                params[i].device());
    ++num_codes;
  }
  TORCH_CHECK(num_codes == importance_scales.size(), op, ": importance_scales has ",
              importance_scales.size(), " tensors, expected one per uint8 (8-bit) importance (",
              num_codes, ")");
}

// TORCH_CHECKs the penalty arguments against the (checked) params and returns the form:
// "none" with empty lists, or "explicit"/"proximal" with a finite scale >= 0 and per param an
// importance (in an importance format of the param, with its block scales in
// `importance_scales` where uint8) and an anchor of its dtype, both of its shape and device, or
// neither.
inline PenaltyForm check_penalty_inputs(at::TensorList params,
                                        const c10::List<std::optional<at::Tensor>>& importances,
                                        at::TensorList importance_scales,
                                        const c10::List<std::optional<at::Tensor>>& anchors,
                                        c10::string_view form_name, double scale) {
  if (form_name == "none") {
    TORCH_CHECK(importances.empty() && anchors.empty() && importance_scales.empty(),
                "classp_step_: penalty_form 'none' takes empty importances, importance_scales "
                "and anchors");
    return PenaltyForm::kNone;
  }
  TORCH_CHECK(form_name == "explicit" || form_name == "proximal",
              "classp_step_: penalty_form must be 'none', 'explicit' or 'proximal', got '",
              std::string(form_name), "'");
  TORCH_CHECK(std::isfinite(scale) && scale >= 0.0,
              "classp_step_: penalty_scale must be a finite number >= 0, got ", scale);
  TORCH_CHECK(importances.size() == params.size() && anchors.size() == params.size(),
              "classp_step_: importances and anchors must have one entry per param (",
              params.size(), "), got ", importances.size(), " and ", anchors.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const std::optional<at::Tensor> weight = importances.get(i);
    const std::optional<at::Tensor> anchor = anchors.get(i);
    TORCH_CHECK(weight.has_value() == anchor.has_value(), "classp_step_: params[", i,
                "] has an importance but no anchor or an anchor but no importance");
    if (!weight.has_value()) {
      continue;
    }
    const at::Tensor& param = params[i];
    for (const at::Tensor* t : {&*weight, &*anchor}) {
      const char* name = t == &*weight ? "importances" : "anchors";
      TORCH_CHECK(t->defined() && t->layout() == c10::kStrided, "classp_step_: ", name, "[", i,
                  "] must be a dense (strided) tensor");
      TORCH_CHECK(t == &*weight ? is_importance_format(param.scalar_type(), t->scalar_type())
                                : t->scalar_type() == param.scalar_type(),
                  "classp_step_: ", name, "[", i, "] has dtype ", t->scalar_type(),
                  t == &*weight ? ", expected an importance format of the param's "
                                : ", expected the param's ",
                  param.scalar_type(),
                  t == &*weight ? " (its dtype, bfloat16, or uint8 8-bit codes)" : "");
      TORCH_CHECK(t->sizes() == param.sizes(), "classp_step_: ", name, "[", i, "] has shape ",
                  t->sizes(), ", expected the param's ", param.sizes());
      TORCH_CHECK(t->device() == param.device(), "classp_step_: ", name, "[", i, "] is on ",
                  t->device(), ", expected the param's device ", param.device());
    }
  }
  std::vector<std::optional<at::Tensor>> held(importances.begin(), importances.end());
  std::vector<const at::Tensor*> weights;
  for (const auto& weight : held) {
    weights.push_back(weight.has_value() ? &*weight : nullptr);
  }
  check_importance_scales("classp_step_", params, weights, importance_scales);
  return form_name == "explicit" ? PenaltyForm::kExplicit : PenaltyForm::kProximal;
}

// TORCH_CHECKs the relative threshold's arguments against the (checked) params: a finite
// relative_threshold >= 0, and gradient means, required when it is > 0, empty or one per param:
// a one-element tensor of the param's compute dtype on its device.
inline void check_grad_sq_means(at::TensorList params, double relative_threshold,
                                at::TensorList grad_sq_means) {
  TORCH_CHECK(std::isfinite(relative_threshold) && relative_threshold >= 0.0,
              "classp_step_: relative_threshold must be a finite number >= 0, got ",
              relative_threshold);
  TORCH_CHECK(grad_sq_means.size() == params.size() ||
                  (grad_sq_means.empty() && relative_threshold == 0.0),
              "classp_step_: grad_sq_means must have one entry per param (", params.size(),
              "), got ", grad_sq_means.size(),
              grad_sq_means.empty() ? " (they are required when relative_threshold > 0)" : "");
  for (size_t i = 0; i < grad_sq_means.size(); ++i) {
    const at::Tensor& mean = grad_sq_means[i];
    const auto dtype = compute_dtype(params[i].scalar_type());
    TORCH_CHECK(mean.defined() && mean.numel() == 1 && mean.scalar_type() == dtype,
                "classp_step_: grad_sq_means[", i, "] must be a one-element ", dtype,
                " tensor");
    TORCH_CHECK(mean.device() == params[i].device(), "classp_step_: grad_sq_means[", i,
                "] is on ", mean.device(), ", expected the param's device ", params[i].device());
  }
}

// TORCH_CHECKs the compressed accumulators' arguments against the (checked) params and accs:
// `acc_scales` holds, in order, one contiguous float32 tensor of one scale per kScaleBlock
// elements for each uint8 accumulator; `rounding_keys`, required when an accumulator is
// compressed, is an int64 tensor of one key per param, with `index_offsets` one index >= 0 per
// param (both absent otherwise); compressed accumulators are contiguous; all on `device`.
inline void check_compressed_inputs(at::TensorList params, at::TensorList accs,
                                    at::TensorList acc_scales,
                                    const std::optional<at::Tensor>& rounding_keys,
                                    c10::IntArrayRef index_offsets, const c10::Device& device) {
  const int64_t n = static_cast<int64_t>(params.size());
  int64_t first_compressed = -1;
  size_t num_codes = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!is_compressed_acc(params[i].scalar_type(), accs[i])) {
      continue;
    }
    TORCH_CHECK(accs[i].is_contiguous(), "classp_step_: accs[", i, "] (a compressed ",
                accs[i].scalar_type(), " accumulator) must be contiguous");
    first_compressed = first_compressed < 0 ? i : first_compressed;
    if (accs[i].scalar_type() != c10::kByte) {
      continue;
    }
    TORCH_CHECK(num_codes < acc_scales.size(), "classp_step_: acc_scales has ",
                acc_scales.size(), " tensors, but accs[", i, "] is uint8 accumulator number ",
                num_codes + 1, " (one scales tensor per uint8 (8-bit) accumulator, in order)");
    const at::Tensor& scales = acc_scales[num_codes];
    const int64_t blocks = num_blocks(params[i].numel());
    TORCH_CHECK(scales.defined() && scales.scalar_type() == c10::kFloat && scales.dim() == 1 &&
                    scales.numel() == blocks && scales.is_contiguous(),
                "classp_step_: acc_scales[", num_codes, "] (of accs[", i,
                "]) must be a contiguous float32 tensor of shape (", blocks, ",) (one scale per ",
                kScaleBlock, " elements), got ",
                scales.defined() ? scales.toString() + " of shape " + c10::str(scales.sizes())
                                 : std::string("an undefined tensor"));
    TORCH_CHECK(scales.device() == device, "classp_step_: acc_scales[", num_codes, "] is on ",
                scales.device(), ", expected the param's device ", device);
    ++num_codes;
  }
  TORCH_CHECK(num_codes == acc_scales.size(), "classp_step_: acc_scales has ", acc_scales.size(),
              " tensors, expected one per uint8 (8-bit) accumulator (", num_codes, ")");
  if (!rounding_keys.has_value()) {
    TORCH_CHECK(first_compressed < 0, "classp_step_: rounding_keys is required when an "
                "accumulator is compressed (accs[", first_compressed, "] is ",
                accs[first_compressed].scalar_type(), ")");
    TORCH_CHECK(index_offsets.empty(), "classp_step_: index_offsets must be empty without "
                "rounding_keys, got ", index_offsets.size(), " entries");
    return;
  }
  const at::Tensor& keys = *rounding_keys;
  TORCH_CHECK(keys.defined() && keys.scalar_type() == c10::kLong && keys.dim() == 1 &&
                  keys.numel() == n,
              "classp_step_: rounding_keys must be an int64 tensor of shape (", n,
              ",) (one key per param), got ",
              keys.defined() ? keys.toString() + " of shape " + c10::str(keys.sizes())
                             : std::string("an undefined tensor"));
  TORCH_CHECK(keys.device() == device, "classp_step_: rounding_keys is on ", keys.device(),
              ", expected the params' device ", device);
  TORCH_CHECK(static_cast<int64_t>(index_offsets.size()) == n, "classp_step_: index_offsets "
              "must have one entry per param (", n, "), got ", index_offsets.size());
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(index_offsets[i] >= 0, "classp_step_: index_offsets[", i,
                "] must be >= 0, got ", index_offsets[i]);
  }
}

// Whether a (param, grad, acc) triple can be stepped as it is, with nothing to explain: dense,
// the grad of the param's dtype and the accumulator of its compute dtype (with `compressed`, for
// a param that is not float64, also a contiguous bfloat16 or uint8 one: classp_fused's
// compressed formats), both of the param's shape, all on `device`, no internal overlap. The
// optimizer's per-step test of tensors it validated before (false sends it back to its full,
// explaining checks), so it raises nothing.
inline bool steppable_as_is(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& acc,
                            const c10::Device& device, bool compressed = false) {
  if (!param.defined() || !grad.defined() || !acc.defined()) {
    return false;
  }
  const auto dtype = param.scalar_type();
  const auto acc_dtype = acc.scalar_type();
  const bool acc_dtype_ok =
      acc_dtype == compute_dtype(dtype) ||
      (compressed && dtype != c10::kDouble &&
       (acc_dtype == c10::kBFloat16 || acc_dtype == c10::kByte) && acc.is_contiguous());
  return param.layout() == c10::kStrided && grad.layout() == c10::kStrided &&
         acc.layout() == c10::kStrided && grad.scalar_type() == dtype && acc_dtype_ok &&
         grad.sizes() == param.sizes() && acc.sizes() == param.sizes() &&
         param.device() == device && grad.device() == device && acc.device() == device &&
         at::has_internal_overlap(param) != at::MemOverlap::Yes &&
         at::has_internal_overlap(acc) != at::MemOverlap::Yes;
}

}  // namespace classp
