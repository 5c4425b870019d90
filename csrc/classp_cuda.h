// Interface between the CUDA op (classp_cuda_op.cpp: tensors, checks, registration) and the CUDA
// kernels (classp_cuda.cu). Plain types only, so the kernel file compiles without ATen headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace classp {

enum class ParamDtype { kFloat, kBFloat16, kHalf, kDouble };

// One tensor triple in device memory, laid out alike (contiguous, or dense with equal strides).
struct DeviceTensors {
  void* param;
  const void* grad;
  void* acc;
  int64_t numel;
  int64_t row;  // row of this tensor in the counts output
};

// A one-element float32/float64 tensor read on the device, or a value known on the host
// (ptr == nullptr).
struct ScalarArg {
  const void* ptr;
  bool is_double;
  double host_value;
};

struct StepArgs {
  ScalarArg lr;
  ScalarArg grad_scale;  // used when has_grad_scale
  ScalarArg found_inf;   // used when has_found_inf: a non-zero value makes the step a no-op
  double threshold, eps, power;
  bool apply_scaling, has_grad_scale, has_found_inf;
};

// Enqueues the step over `tensors` (all of `dtype`, none empty) on `stream`; adds the per-tensor
// [updated, nonfinite] counts into `counts` (int64, 2 per row, zeroed by the caller).
cudaError_t launch_classp_step(ParamDtype dtype, const std::vector<DeviceTensors>& tensors,
                               const StepArgs& args, int64_t* counts, cudaStream_t stream);

}  // namespace classp
