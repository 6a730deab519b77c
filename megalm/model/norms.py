"""LayerNorm and RMSNorm, sequence-parallel aware (their weights see only a sequence chunk per rank).

Under sequence parallelism the weight passes through ``copy_to_tensor_region``
so its gradient is summed over TP ranks inside autograd; no hook is needed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.parallel import state
from megalm.parallel.compiled_ops import fusable
from megalm.parallel.layers import mark_sequence_parallel
from megalm.parallel.mappings import copy_to_tensor_region


class Norm(nn.Module):
    def __init__(self, hidden: int, eps: float, bias: bool, sequence_parallel: Optional[bool]) -> None:
        super().__init__()
        sequence_parallel = state.sequence_parallel() if sequence_parallel is None else sequence_parallel
        self.eps, self.sequence_parallel = eps, sequence_parallel
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden)) if bias else None
        if sequence_parallel:
            for p in self.parameters():
                mark_sequence_parallel(p)

    def _params(self) -> tuple:
        if not self.sequence_parallel:
            return self.weight, self.bias
        b = copy_to_tensor_region(self.bias) if self.bias is not None else None
        return copy_to_tensor_region(self.weight), b


class LayerNorm(Norm):
    def __init__(self, hidden: int, eps: float = 1e-5, sequence_parallel: Optional[bool] = None) -> None:
        super().__init__(hidden, eps, True, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._params()
        return F.layer_norm(x, (x.size(-1),), w, b, self.eps)


class RMSNorm(Norm):
    """x / rms(x) * w, computed in fp32 and cast back (as HF Llama does, so exports match)."""

    def __init__(self, hidden: int, eps: float = 1e-5, sequence_parallel: Optional[bool] = None) -> None:
        super().__init__(hidden, eps, False, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, _ = self._params()
        return _rms_norm(x, w, self.eps)


@fusable
def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.size(-1),), w, eps)
    return F.rms_norm(x.float(), (x.size(-1),), None, eps).to(x.dtype) * w


def make_norm(m: ModelConfig, sequence_parallel: Optional[bool] = None) -> nn.Module:
    """model.norm over the hidden size; ``sequence_parallel`` None: the layout's (``parallel.state``)."""
    cls = LayerNorm if m.norm == "layernorm" else RMSNorm
    return cls(m.hidden_size, m.norm_eps, sequence_parallel)
