"""The feed-forward block: column-parallel up (GELU, or SwiGLU with fused [gate; up]), row-parallel down."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.parallel.fused import fusable
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear, param_seed


class MLP(nn.Module):
    def __init__(self, m: ModelConfig, layer: int, seed: int, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.swiglu = m.activation == "swiglu"
        f = m.ffn_size
        parts = (f, f) if self.swiglu else (f,)
        name = f"layers.{layer}.mlp"
        self.fc1 = ColumnParallelLinear(m.hidden_size, sum(parts), bias=m.bias, partitions=parts,
                                        init_std=m.init_std, seed=param_seed(seed, name + ".fc1.weight"),
                                        sequence_parallel=sequence_parallel)
        self.fc2 = RowParallelLinear(f, m.hidden_size, bias=m.bias, init_std=m.init_std / (2.0 * m.num_layers) ** 0.5,
                                     seed=param_seed(seed, name + ".fc2.weight"), sequence_parallel=sequence_parallel)

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
