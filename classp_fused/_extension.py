"""Loads the compiled extension ``classp_fused._C``: the C++ (CPU) and CUDA kernels of the step op
and a metadata test of stepped tensors.

The op ``classp_fused::classp_step_`` is declared in csrc/classp_cpu.cpp; its fake (meta)
implementation lives here so FakeTensor, torch.compile and opcheck can trace it.
"""
import functools

import torch

try:
    from . import _C  # registers torch.ops.classp_fused.classp_step_
    LOAD_ERROR = None
    # (params, grads, accs) -> whether every triple is dense, dtype- and shape-consistent, on one
    # device (csrc/classp_checks.h): the optimizer's per-step test of a group it validated before
    steppable_as_is = _C.steppable_as_is
except ImportError as error:  # the package still works without it, on the foreach backend
    LOAD_ERROR = error
    steppable_as_is = None

OP_NAME = "classp_fused::classp_step_"

if LOAD_ERROR is None:
    @torch.library.register_fake(OP_NAME)
    def _classp_step_fake(params, grads, accs, lr, threshold, eps, power, apply_scaling,
                          grad_scale, found_inf, importances, anchors, penalty_form,
                          penalty_scale, relative_threshold, grad_sq_means, acc_scales,
                          rounding_keys, index_offsets):
        # As the kernels choose: the params' device, else a non-CPU scalar argument's.
        scalars = [t for t in (grad_scale, found_inf, lr) if t is not None]
        device = params[0].device if params else next(
            (t.device for t in scalars if t.device.type != "cpu"), torch.device("cpu"))
        return torch.empty(len(params), 2, dtype=torch.int64, device=device)


def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered a step kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME,
                                                                                 dispatch_key)


@functools.lru_cache(maxsize=16)
def _lr_tensor(lr: float) -> torch.Tensor:
    """A float lr as the op's 0-dim float64 tensor, made once per value (the op only reads it)."""
    return torch.tensor(lr, dtype=torch.float64)


def call_step_op(params, grads, accs, spec):
    """Run ``torch.ops.classp_fused.classp_step_`` as ``spec`` (a ``StepSpec``) says, a float
    lr as a 0-dim float64 tensor."""
    lr = spec.lr if isinstance(spec.lr, torch.Tensor) else _lr_tensor(spec.lr)
    return torch.ops.classp_fused.classp_step_(params, grads, accs, *spec.op_arguments(lr))
