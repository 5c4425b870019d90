// CUDA kernel registration of classp_fused::classp_step_: checks, layouts, device scalars, the
// cached work tables and the counts output; the kernels themselves are in classp_cuda.cu.
// Built only with CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_copy.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstddef>
#include <list>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "classp_checks.h"
#include "classp_cuda.h"
#include "classp_plan.h"

namespace classp {
namespace {

// Work tables in device memory, one per device, dtype, accumulator format, importance format
// and list of tensor records, built on first use and reused while the same tensors are
// stepped: a step then copies nothing from the host. The least recently used table is dropped
// beyond kCachedTables, except tables a CUDA graph captured, kept for good since a replay reads
// them. A table first needed while a stream is capturing is built inside the graph (its writes
// are kernels the graph replays) and not cached, as eager steps could read it before any
// replay.
class WorkTableCache {
 public:
  // The table and a tensor owning its memory (valid at least until the step is enqueued).
  std::pair<DeviceWorkTable, at::Tensor> get(c10::Device device, ParamDtype dtype,
                                             AccFormat format, ImportanceFormat importance,
                                             const std::vector<TensorRecord>& records,
                                             const c10::cuda::CUDAStream& stream) {
    std::vector<int64_t> key{device.index(), static_cast<int64_t>(dtype),
                             static_cast<int64_t>(format), static_cast<int64_t>(importance)};
    key.reserve(4 + records.size() * kRecordColumns);
    for (const TensorRecord& r : records) {
      key.insert(key.end(), {r.param, r.grad, r.acc, r.numel, r.row, r.weight, r.anchor,
                             r.scales, r.first_index, r.weight_scales});
    }
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
    const bool capturing = capture != cudaStreamCaptureStatusNone;

    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = index_.find(key);
    if (found != index_.end()) {
      Entry& entry = *found->second;
      if (capturing) {
        entry.kept = true;
      } else if (entry.stream != stream) {
        entry.tensor.record_stream(stream);
      }
      entries_.splice(entries_.begin(), entries_, found->second);
      return {entry.table, entry.tensor};
    }
    const std::vector<int64_t> image = work_table(records);
    at::Tensor tensor = at::empty({static_cast<int64_t>(image.size())},
                                  at::TensorOptions().dtype(at::kLong).device(device));
    C10_CUDA_CHECK(write_to_device(image, tensor.data_ptr<int64_t>(), stream.stream()));
    const DeviceWorkTable table{tensor.data_ptr<int64_t>(),
                                static_cast<int64_t>(records.size()),
                                static_cast<int64_t>(image.size() - records.size() *
                                                                        kRecordColumns)};
    if (!capturing) {
      entries_.push_front({key, tensor, table, stream, false});
      index_.emplace(std::move(key), entries_.begin());
      drop_least_recent();
    }
    return {table, tensor};
  }

 private:
  static constexpr size_t kCachedTables = 64;

  struct Entry {
    std::vector<int64_t> key;
    at::Tensor tensor;
    DeviceWorkTable table;
    c10::cuda::CUDAStream stream;  // where the tensor was allocated
    bool kept;                     // read by a captured graph
  };

  struct KeyHash {
    size_t operator()(const std::vector<int64_t>& key) const {
      size_t hash = key.size();
      for (int64_t value : key) {
        hash ^= std::hash<int64_t>()(value) + 0x9e3779b97f4a7c15ULL + (hash << 6) + (hash >> 2);
      }
      return hash;
    }
  };

  void drop_least_recent() {
    size_t dropable = 0;
    for (const Entry& entry : entries_) {
      dropable += !entry.kept;
    }
    for (auto it = entries_.end(); dropable > kCachedTables && it != entries_.begin();) {
      --it;
      if (!it->kept) {
        index_.erase(it->key);
        it = entries_.erase(it);
        --dropable;
      }
    }
  }

  std::mutex mutex_;
  std::list<Entry> entries_;  // most recently used first
  std::unordered_map<std::vector<int64_t>, std::list<Entry>::iterator, KeyHash> index_;
};

// Never destroyed: the tables' memory must not be returned after CUDA shuts down at exit.
WorkTableCache& work_tables() {
  static auto* cache = new WorkTableCache();
  return *cache;
}

// `t` read on the device when it lives there, else its value now.
ScalarArg scalar_arg(const at::Tensor& t, const char* name) {
  if (t.device().is_cpu()) {
    return {nullptr, false, t.item<double>()};
  }
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "classp_step_: ",
              name, " on the GPU must be float32 or float64, got ", t.scalar_type());
  return {t.data_ptr(), t.scalar_type() == at::kDouble, 0.0};
}

// The device of the step: the params', or for an empty list that of a CUDA scalar argument.
c10::Device step_device(at::TensorList params, const at::Tensor& lr,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  if (!params.empty()) {
    return params[0].device();
  }
  for (const auto* t : {&grad_scale, &found_inf}) {
    if (t->has_value() && (*t)->is_cuda()) {
      return (*t)->device();
    }
  }
  return lr.device();
}

// The format of an importance of dtype `importance` of a `param` dtype param (one the checks
// accepted).
ImportanceFormat importance_format(c10::ScalarType param, c10::ScalarType importance) {
  if (importance == param) {
    return ImportanceFormat::kParam;
  }
  return importance == at::kByte ? ImportanceFormat::kCode8 : ImportanceFormat::kBFloat16;
}

ParamDtype param_dtype(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ParamDtype::kFloat;
    case at::kBFloat16:
      return ParamDtype::kBFloat16;
    case at::kHalf:
      return ParamDtype::kHalf;
    case at::kDouble:
      return ParamDtype::kDouble;
    default:
      TORCH_CHECK(false, "classp_step_: unsupported dtype ", dtype);
  }
}

// Replaces the gradient means with the launches' sums / sizes (float64, per row), keeping `old`
// where no element was counted (an empty tensor, a step skipped by found_inf): device ops.
void publish_means(at::TensorList means, const at::Tensor& old, const at::Tensor& sums,
                   const at::Tensor& sizes) {
  const at::Tensor fresh = at::where(at::gt(sizes, 0), at::div(sums, sizes), old);
  std::array<std::vector<at::Tensor>, 2> targets, values;  // float32 means, float64 means
  const at::Tensor as_float = fresh.to(at::kFloat);
  for (size_t i = 0; i < means.size(); ++i) {
    const bool wide = means[i].scalar_type() == at::kDouble;
    targets[wide].push_back(means[i]);
    values[wide].push_back((wide ? fresh : as_float)[static_cast<int64_t>(i)]);
  }
  for (int wide = 0; wide < 2; ++wide) {
    if (!targets[wide].empty()) {
      at::_foreach_copy_(targets[wide], values[wide]);
    }
  }
}

at::Tensor classp_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList accs,
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
  const c10::Device device = step_device(params, lr, grad_scale, found_inf);
  TORCH_CHECK(device.is_cuda(), "classp_step_: the CUDA kernel got tensors on ", device);
  check_step_inputs(params, grads, accs, lr, threshold, eps, power, grad_scale, found_inf,
                    device, /*compressed=*/true);
  const PenaltyForm form = check_penalty_inputs(params, importances, importance_scales, anchors,
                                                penalty_form, penalty_scale);
  check_grad_sq_means(params, relative_threshold, grad_sq_means);
  check_compressed_inputs(params, accs, acc_scales, rounding_keys, index_offsets, device);
  const c10::cuda::CUDAGuard device_guard(device);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor counts = at::zeros({n, 2}, at::TensorOptions().dtype(at::kLong).device(device));

  StepArgs args{};
  args.lr = scalar_arg(lr, "lr");
  args.has_grad_scale = grad_scale.has_value();
  if (args.has_grad_scale) {
    args.grad_scale = scalar_arg(*grad_scale, "grad_scale");
  }
  args.has_found_inf = found_inf.has_value();
  if (args.has_found_inf) {
    args.found_inf = scalar_arg(*found_inf, "found_inf");
  }
  args.threshold = threshold;
  args.eps = eps;
  args.power = power;
  args.apply_scaling = apply_scaling;
  args.penalty_factor = 2.0 * penalty_scale;
  // Gradient means: read from a stacked copy, summed into scratch, published after the launches
  // (no block reads a mean another one writes).
  at::Tensor old_means, square_sums, sizes;
  args.means = {relative_threshold, nullptr, nullptr, nullptr};
  if (!grad_sq_means.empty()) {
    old_means = at::stack(grad_sq_means).to(at::kDouble);
    square_sums = at::zeros({n}, old_means.options());
    sizes = at::zeros({n}, old_means.options().dtype(at::kLong));
    args.means.old_means = old_means.data_ptr<double>();
    args.means.square_sums = square_sums.data_ptr<double>();
    args.means.sizes = reinterpret_cast<unsigned long long*>(sizes.data_ptr<int64_t>());
  }
  // Compressed accumulators: the keys read on the device, the scales updated in place.
  args.rounding_keys = rounding_keys.has_value() ? rounding_keys->data_ptr<int64_t>() : nullptr;

  // Tensors laid out differently are updated on contiguous copies, written back afterwards.
  std::vector<at::Tensor> work_params(n), work_grads(n), work_accs(n), work_weights(n),
      work_anchors(n);
  // Records by coverage (0: the tensors the penalty does not cover, 1 + ImportanceFormat: those
  // it covers, by the format of their importances), ParamDtype and AccFormat: one launch each.
  std::array<std::array<std::array<std::vector<TensorRecord>, 3>, 4>, 4> groups;
  size_t codes = 0;  // the uint8 accumulators so far: their scales' index in acc_scales
  size_t weight_codes = 0;  // the uint8 importances so far: their index in importance_scales
  for (int64_t i = 0; i < n; ++i) {
    const AccFormat format = acc_format(params[i].scalar_type(), accs[i].scalar_type());
    const at::Tensor* scales = format == AccFormat::kCode8 ? &acc_scales[codes++] : nullptr;
    std::optional<at::Tensor> weight, anchor;
    const at::Tensor* weight_scales = nullptr;
    if (form != PenaltyForm::kNone) {
      weight = importances.get(i);
      anchor = anchors.get(i);
      if (weight.has_value() && weight->scalar_type() == at::kByte) {
        weight_scales = &importance_scales[weight_codes++];
      }
    }
    if (params[i].numel() == 0) {
      continue;
    }
    const auto& strides = params[i].strides();
    const bool direct = params[i].is_non_overlapping_and_dense() &&
                        grads[i].strides() == strides && accs[i].strides() == strides &&
                        (!weight.has_value() || (weight->strides() == strides &&
                                                 anchor->strides() == strides));
    work_params[i] = direct ? params[i] : params[i].contiguous();
    work_grads[i] = direct ? grads[i] : grads[i].contiguous();
    work_accs[i] = direct ? accs[i] : accs[i].contiguous();
    int64_t weight_address = 0;
    int64_t anchor_address = 0;
    int coverage = 0;
    if (weight.has_value()) {
      // a uint8 importance is contiguous, its scales indexed in row-major order: when the param
      // is not, none is direct
      work_weights[i] = direct ? *weight : weight->contiguous();
      work_anchors[i] = direct ? *anchor : anchor->contiguous();
      weight_address = reinterpret_cast<int64_t>(work_weights[i].data_ptr());
      anchor_address = reinterpret_cast<int64_t>(work_anchors[i].data_ptr());
      coverage = 1 + static_cast<int>(importance_format(params[i].scalar_type(),
                                                        weight->scalar_type()));
    }
    groups[coverage][static_cast<int>(param_dtype(params[i].scalar_type()))]
          [static_cast<int>(format)]
              .push_back({reinterpret_cast<int64_t>(work_params[i].data_ptr()),
                          reinterpret_cast<int64_t>(work_grads[i].data_ptr()),
                          reinterpret_cast<int64_t>(work_accs[i].data_ptr()), params[i].numel(),
                          i, weight_address, anchor_address,
                          scales ? reinterpret_cast<int64_t>(scales->data_ptr()) : 0,
                          format == AccFormat::kExact ? 0 : index_offsets[i],
                          weight_scales ? reinterpret_cast<int64_t>(weight_scales->data_ptr())
                                        : 0});
  }
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  for (size_t coverage = 0; coverage < groups.size(); ++coverage) {
    const PenaltyForm launch_form = coverage ? form : PenaltyForm::kNone;
    const auto importance =
        coverage ? static_cast<ImportanceFormat>(coverage - 1) : ImportanceFormat::kParam;
    for (size_t dtype = 0; dtype < groups[coverage].size(); ++dtype) {
      for (size_t format = 0; format < groups[coverage][dtype].size(); ++format) {
        const std::vector<TensorRecord>& records = groups[coverage][dtype][format];
        if (records.empty()) {
          continue;
        }
        const auto [table, owner] = work_tables().get(device, static_cast<ParamDtype>(dtype),
                                                      static_cast<AccFormat>(format), importance,
                                                      records, stream);
        C10_CUDA_CHECK(launch_classp_step(static_cast<ParamDtype>(dtype),
                                          static_cast<AccFormat>(format), launch_form,
                                          importance, table, args,
                                          counts.data_ptr<int64_t>(), stream.stream()));
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (work_params[i].defined() && !work_params[i].is_same(params[i])) {
      params[i].copy_(work_params[i]);
    }
    if (work_accs[i].defined() && !work_accs[i].is_same(accs[i])) {
      accs[i].copy_(work_accs[i]);
    }
  }
  if (!grad_sq_means.empty()) {
    publish_means(grad_sq_means, old_means, square_sums, sizes);
  }
  return counts;
}

}  // namespace
}  // namespace classp

TORCH_LIBRARY_IMPL(classp_fused, CUDA, m) {
  m.impl("classp_step_", &classp::classp_step_cuda);
}
