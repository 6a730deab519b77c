"""The feed-forward block: column-parallel up (GELU, or SwiGLU with fused [gate; up]), row-parallel down."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.parallel.compiled_ops import fusable
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.swiglu = m.activation == "swiglu"
        f = m.ffn_size
        parts = (f, f) if self.swiglu else (f,)
        self.fc1 = ColumnParallelLinear(m.hidden_size, sum(parts), bias=m.bias, partitions=parts)
        self.fc2 = RowParallelLinear(f, m.hidden_size, bias=m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(_swiglu(h) if self.swiglu else _gelu(h))


@fusable
def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@fusable
def _gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h)
