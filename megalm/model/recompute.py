"""``train.activation_checkpointing``, applied from outside the model: on a plain model and a pipeline alike.

``full`` reruns each Transformer block in backward, ``selective`` only the attention
core (Megatron's selective recomputation), ``none`` stores every activation. Both
recompute RNG-correctly (``megalm.parallel.random.checkpoint``), so dropout masks match.
"""

from __future__ import annotations

from typing import get_args

import torch.nn as nn

from megalm.config import Recompute
from megalm.errors import ConfigError

MODES = get_args(Recompute)


def apply_recompute(module: nn.Module, mode: str) -> nn.Module:
    """Set ``mode`` on every Transformer block inside ``module`` (in place); returns the module."""
    from megalm.model.block import Block

    if mode not in MODES:
        raise ConfigError(f"train.activation_checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
    for block in module.modules():
        if isinstance(block, Block):
            block.recompute = "full" if mode == "full" else "none"
            block.attention.recompute_core = mode == "selective"
    return module
