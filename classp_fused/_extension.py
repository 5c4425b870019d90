"""Loads the compiled extension ``classp_fused._C``: the C++ (CPU) and CUDA kernels of the step op,
the CPU kernels of the penalty's unfused passes, and a metadata test of stepped tensors.

The op ``classp_fused::classp_step_`` is declared in csrc/classp_cpu.cpp, the ops
``classp_fused::add_penalty_grad_`` and ``classp_fused::proximal_step_`` in
csrc/classp_penalty_ops.cpp; their fake (meta) implementations live here so FakeTensor,
torch.compile and opcheck can trace them.
"""
import functools

import torch

try:
    from . import _C  # registers torch.ops.classp_fused.classp_step_
    LOAD_ERROR = None
    # the grads of a param group's planned params if the group still holds what it held when
    # it was validated, else None (csrc/classp_module.cpp): the optimizer's per-step test
    plan_grads = _C.plan_grads
except ImportError as error:  # the package still works without it, on the foreach backend
    LOAD_ERROR = error
    plan_grads = None

OP_NAME = "classp_fused::classp_step_"

if LOAD_ERROR is None:
    @torch.library.register_fake(OP_NAME)
    def _classp_step_fake(params, grads, accs, lr, threshold, eps, power, apply_scaling,
                          grad_scale, found_inf, importances, anchors, penalty_form,
                          penalty_scale, importance_scales, relative_threshold, grad_sq_means, acc_scales,
                          rounding_keys, index_offsets):
        # As the kernels choose: the params' device, else a non-CPU scalar argument's.
        scalars = [t for t in (grad_scale, found_inf, lr) if t is not None]
        device = params[0].device if params else next(
            (t.device for t in scalars if t.device.type != "cpu"), torch.device("cpu"))
        return torch.empty(len(params), 2, dtype=torch.int64, device=device)

    @torch.library.register_fake("classp_fused::add_penalty_grad_")
    def _add_penalty_grad_fake(params, importances, importance_scales, anchors, grads, factor,
                               grad_scale):
        return None  # writes its grads in place, returns nothing

    @torch.library.register_fake("classp_fused::proximal_step_")
    def _proximal_step_fake(params, importances, importance_scales, anchors, step_tensors,
                            step_values, factor):
        return None  # writes its params in place, returns nothing


def has_kernel(dispatch_key: str, op_name: str = OP_NAME) -> bool:
    """Whether the extension registered a kernel of ``op_name`` (the step op by default) for
    ``dispatch_key`` ("CPU", "CUDA")."""
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(op_name,
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
