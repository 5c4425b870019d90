"""Backend ``torch``: the reference, one tensor at a time (any device, float64 too)."""
from ..reference import classp_step_

COMPRESSED_STATE = True


def is_available(device) -> bool:
    return True


def step(params, grads, accs, spec):
    return classp_step_(params, grads, accs, lr=spec.lr, threshold=spec.threshold, eps=spec.eps,
                        power=spec.power, apply_scaling=spec.apply_scaling,
                        grad_scale=spec.grad_scale, found_inf=spec.found_inf,
                        penalty=spec.penalty, relative_threshold=spec.relative_threshold,
                        grad_sq_means=spec.grad_sq_means,
                        compressed=spec.compressed)
