"""Shared test data: fresh random tensors (never zeros) and bitwise comparison."""
import torch

import classp_fused

CPU_BACKENDS = classp_fused.available_backends("cpu")


def random_like(shape, dtype=torch.float32, generator=None, scale=1.0):
    """Normal random values scaled by ``scale``, with no exact zeros."""
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale
    x = torch.where(x == 0, torch.full_like(x, 1e-3), x)
    return x.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of ``t``, for bit-identity checks that also hold for NaN and -0.0."""
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(int_dtype)


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).to(dtype)


def train_steps(model, optimizer, steps=5, seed=1, scheduler=None):
    """Run ``steps`` steps of a squared-output loss on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g).to(dtype)
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
