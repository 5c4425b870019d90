"""Networks for the continual-learning benchmarks."""
from __future__ import annotations

import math
from typing import Sequence

from torch import nn


def mlp(input_shape: Sequence[int], num_classes: int,
        hidden: Sequence[int] = (100, 100)) -> nn.Sequential:
    """Flatten, then ReLU hidden layers (default 100-100), then a linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def paper_cnn(input_shape: Sequence[int], num_classes: int) -> nn.Sequential:
    """The published vision network: conv32-conv64-pool-dropout-fc128-fc10 (3x3 kernels, ReLU)."""
    channels, height, width = input_shape
    flat = 64 * ((height - 4) // 2) * ((width - 4) // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(flat, 128), nn.ReLU(),
        nn.Linear(128, num_classes))


MODELS = {"mlp": mlp, "cnn": paper_cnn}
