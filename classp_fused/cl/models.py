"""Networks for the continual-learning benchmarks."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .streams import Stream


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


class TextTransformer(nn.Module):
    """A small BERT-like encoder classifier over token ids, randomly initialised.

    Learned token and position embeddings, ``nn.TransformerEncoder`` (post-norm layers with
    GELU), the mean of the final states over the attended positions, then a linear head.
    ``forward(input_ids, attention_mask=None)``: ids (batch, length <= ``seq_len``); the
    mask (1 or True where a token is attended) defaults to ``input_ids != pad_id``, so a
    batch is the ids alone or a mapping ``{"input_ids", "attention_mask"}``.
    """

    def __init__(self, vocab_size: int, seq_len: int, num_classes: int, hidden: int = 64,
                 layers: int = 2, heads: int = 4, feedforward: int = 128, dropout: float = 0.1,
                 pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, hidden)
        self.positions = nn.Embedding(seq_len, hidden)
        self.norm = nn.LayerNorm(hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, feedforward, dropout,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] > self.positions.num_embeddings:
            raise ValueError(f"input_ids: expected (batch, length <= "
                             f"{self.positions.num_embeddings}) token ids, got shape"
                             f" {tuple(input_ids.shape)}")
        keep = input_ids != self.pad_id if attention_mask is None else attention_mask.bool()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        states = self.norm(self.tokens(input_ids) + self.positions(positions))
        states = self.encoder(states, src_key_padding_mask=~keep)
        weights = keep.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


def text_transformer(input_shape: Sequence[int], num_classes: int,
                     vocab_size: int) -> TextTransformer:
    """The text benchmarks' encoder: hidden 64, 2 layers, 4 heads, feed-forward 128."""
    (seq_len,) = input_shape
    return TextTransformer(vocab_size, seq_len, num_classes)


MODELS = {"mlp": mlp, "cnn": paper_cnn}
#: Networks over token ids: built from the stream's vocabulary size too.
TOKEN_MODELS = {"transformer": text_transformer}


def build_model(name: str, stream: Stream) -> nn.Module:
    """Network ``name`` sized for ``stream``: its input shape, labels and any vocabulary."""
    if name in TOKEN_MODELS:
        if stream.vocab_size is None:
            raise ValueError(f"model {name!r} reads token ids; stream {stream.name!r} has none")
        return TOKEN_MODELS[name](stream.input_shape, stream.num_classes, stream.vocab_size)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (choose from"
                         f" {', '.join([*MODELS, *TOKEN_MODELS])})")
    if stream.vocab_size is not None:
        raise ValueError(f"model {name!r} reads images; stream {stream.name!r} holds token ids")
    return MODELS[name](stream.input_shape, stream.num_classes)
