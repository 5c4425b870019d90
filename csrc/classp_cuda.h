// Interface between the CUDA op (classp_cuda_op.cpp: tensors, checks, the cached work tables,
// registration) and the CUDA kernels (classp_cuda.cu). Plain types only, so the kernel file
// compiles without ATen headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "classp_formats.h"
#include "classp_penalty.h"

namespace classp {

enum class ParamDtype { kFloat, kBFloat16, kHalf, kDouble };

// A one-element float32/float64 tensor read on the device, or a value known on the host
// (ptr == nullptr).
struct ScalarArg {
  const void* ptr;
  bool is_double;
  double host_value;
};

// Gradient means (the relative threshold), per counts row in device memory: the means read
// (as float64), and the sums of squared finite gradients and the element counts the launch adds
// to; all nullptr without means. The op publishes the new means after the launches.
struct MeanArgs {
  double relative_threshold;
  const double* old_means;
  double* square_sums;
  unsigned long long* sizes;
};

struct StepArgs {
  ScalarArg lr;
  ScalarArg grad_scale;  // used when has_grad_scale
  ScalarArg found_inf;   // used when has_found_inf: a non-zero value makes the step a no-op
  double threshold, eps, power;
  double penalty_factor;  // 2 * the penalty's scale
  bool apply_scaling, has_grad_scale, has_found_inf;
  MeanArgs means;
  // Compressed accumulators: the rounding key of each counts row, in device memory (nullptr
  // when nothing is compressed).
  const int64_t* rounding_keys;
};

// A work table (classp_plan.h) in device memory: `num_records` tensor records, then
// `num_chunks` chunk entries. Its tensors are all of one dtype and accumulator format, and all
// covered by the penalty (records with importance and anchor addresses, importances of one
// format) or none.
struct DeviceWorkTable {
  const int64_t* data;
  int64_t num_records;
  int64_t num_chunks;
};

// Enqueues writes of `values` (host memory, read before returning) to `dst` (device memory) on
// `stream` as kernel launches, whose arguments carry the values: nothing is copied from host
// memory, so the writes can be captured into a CUDA graph and replayed.
cudaError_t write_to_device(const std::vector<int64_t>& values, int64_t* dst, cudaStream_t stream);

// Enqueues the step over the tensors of `table` (all of `dtype` with accumulators in `format`,
// stepped with `form`, their importances in `importance` unless the form is kNone) on `stream`
// as one launch; adds the per-tensor [updated, nonfinite] counts into `counts` (int64, 2 per
// row, zeroed by the caller). float64 params take kExact accumulators and kParam importances
// only; kBFloat16 importances are of float32 and float16 params.
cudaError_t launch_classp_step(ParamDtype dtype, AccFormat format, PenaltyForm form,
                               ImportanceFormat importance, const DeviceWorkTable& table,
                               const StepArgs& args, int64_t* counts, cudaStream_t stream);

}  // namespace classp
