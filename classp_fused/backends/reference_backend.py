"""Backend ``torch``: the reference, one tensor at a time (any device, float64 too)."""
from ..reference import classp_step_


def is_available(device) -> bool:
    return True


def step(params, grads, accs, lr, threshold, eps, power, apply_scaling, grad_scale, found_inf):
    return classp_step_(params, grads, accs, lr=lr, threshold=threshold, eps=eps, power=power,
                        apply_scaling=apply_scaling, grad_scale=grad_scale, found_inf=found_inf)
