// Declares the multi-tensor CLASSP step op. Kernels register per dispatch key.
#include <torch/library.h>

TORCH_LIBRARY(classp_fused, m) {
  m.def(
      "classp_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] accs, Tensor lr, "
      "float threshold, float eps, float power, bool apply_scaling, Tensor? grad_scale, "
      "Tensor? found_inf) -> Tensor");
}
