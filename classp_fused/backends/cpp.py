"""Backend ``cpp``: the C++ CPU kernel in csrc/classp_cpu.cpp (vectorized, parallel,
multi-tensor)."""
from .._extension import call_step_op as step, has_kernel  # noqa: F401

COMPRESSED_STATE = True  # bfloat16 and 8-bit accumulators (classp_fused.state_formats)


def is_available(device) -> bool:
    return device.type == "cpu" and has_kernel("CPU")
