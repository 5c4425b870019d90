"""Backend ``foreach``: the CLASSP step with torch._foreach ops, grouped by device and dtype."""
import torch


def is_available(device) -> bool:
    return True


def _step_group(params, grads, accs, lr, threshold, eps, power, apply_scaling, grad_scale,
                found_inf):
    dtype = accs[0].dtype
    g = [x.to(dtype) for x in grads]
    if grad_scale is not None:
        g = torch._foreach_div(g, grad_scale.to(device=g[0].device, dtype=dtype))
    finite = [torch.isfinite(x) for x in g]
    masks = [f & (s > threshold) for f, s in zip(finite, torch._foreach_mul(g, g))]
    nonfinite = [~f for f in finite]
    if found_inf is not None:  # an overflowed AMP step changes and counts nothing
        no_inf = found_inf.to(g[0].device) == 0
        masks = [m & no_inf for m in masks]
        nonfinite = [n & no_inf for n in nonfinite]
    g = [torch.where(m, x, 0) for m, x in zip(masks, g)]

    if power == 1:
        torch._foreach_add_(accs, torch._foreach_abs(g))
    elif power == 2:
        torch._foreach_add_(accs, torch._foreach_mul(g, g))
    else:
        torch._foreach_add_(accs, torch._foreach_pow(torch._foreach_abs(g), power))

    if apply_scaling:
        denom = [torch.where(m, d, 1) for m, d in zip(masks, torch._foreach_add(accs, eps))]
        if power == 1:
            update = torch._foreach_div(g, denom)
        elif power == 2:
            update = torch._foreach_mul(g, torch._foreach_rsqrt(denom))
        else:
            update = torch._foreach_div(g, torch._foreach_pow(denom, 1.0 / power))
    else:
        update = g
    update = torch._foreach_mul(update, lr)

    if params[0].dtype == dtype:
        torch._foreach_sub_(params, update)
    else:
        wide = [p.to(dtype) for p in params]
        torch._foreach_sub_(wide, update)
        torch._foreach_copy_(params, wide)
    return [torch.stack([m.sum(), n.sum()]) for m, n in zip(masks, nonfinite)]


def step(params, grads, accs, lr, threshold, eps, power, apply_scaling, grad_scale, found_inf):
    device = params[0].device if params else torch.device("cpu")
    groups: dict = {}  # (device, dtype) -> indices of non-empty tensors, in traceable Python
    for i, p in enumerate(params):
        if p.numel():
            groups.setdefault((p.device, p.dtype), []).append(i)
    rows = [torch.zeros(2, dtype=torch.int64, device=device)] * len(params)
    for indices in groups.values():
        group_rows = _step_group([params[i] for i in indices], [grads[i] for i in indices],
                                 [accs[i] for i in indices], lr, threshold, eps, power,
                                 apply_scaling, grad_scale, found_inf)
        for i, row in zip(indices, group_rows):
            rows[i] = row.to(device)
    if not rows:
        return torch.zeros(0, 2, dtype=torch.int64, device=device)
    return torch.stack(rows)
