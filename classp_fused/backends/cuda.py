"""Backend ``cuda``: the C++/CUDA kernel in csrc/classp_cuda.cu (one persistent launch per dtype
group over a work table cached in device memory; a float lr is a kernel argument)."""
import torch

from .._extension import call_step_op as step, has_kernel  # noqa: F401

COMPRESSED_STATE = True  # bfloat16 and 8-bit accumulators (classp_fused.state_formats)


def is_available(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and has_kernel("CUDA")
