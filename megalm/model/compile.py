"""``train.compile``: which parts of the model run through torch.compile, applied from outside the model.

``none`` runs eager; ``fused`` compiles the small memory-bound functions
(norms, activations, RoPE, the one-rank loss: ``megalm.parallel.compiled_ops``);
``blocks`` compiles each Transformer block (as torchtitan does) and
the fused functions outside the blocks. ``auto`` (the default) is resolved
before the run's config.yaml is written (see ``resolve_compile``). A mode
that fails to compile falls back to eager with one warning.
"""

from __future__ import annotations

import functools
import logging
from typing import get_args

import torch

from megalm.config import CompileMode
from megalm.errors import ConfigError

log = logging.getLogger(__name__)

MODES = get_args(CompileMode)

# The fastest exact mode per device type, measured with benchmarks/train_step.py --compile-modes (docs/model.md).
# CUDA is not measured yet: "blocks" is torchtitan's default there.
FASTEST = {"cpu": "fused", "cuda": "blocks"}


def resolve_compile(mode: str, device_type: str) -> str:
    """``auto`` -> the measured fastest mode for this device type; anything else as given (checked)."""
    if mode not in MODES:
        raise ConfigError(f"train.compile must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return FASTEST.get(device_type, "none")


def apply_compile(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Set up ``mode`` on ``model`` in place (``auto``: resolved for the parameters' device); returns the model."""
    from megalm.parallel import compiled_ops

    if mode == "auto":
        param = next(model.parameters(), None)
        mode = resolve_compile(mode, param.device.type if param is not None else "cpu")
    compiled_ops.enable(mode in ("fused", "blocks"))
    if mode == "blocks":
        from megalm.model.block import Block

        for module in model.modules():
            if isinstance(module, Block):
                _compile_step(module)
    return model


_warned: list = []


def _compile_step(block: torch.nn.Module) -> None:
    """Replace this instance's ``step`` (what ``Block.forward`` calls) by its compiled version, eager if that fails.

    An instance attribute, so parameter names, state dicts and checkpoints are unchanged.
    """
    eager = block.step
    compiled = torch.compile(eager, dynamic=False)
    broken: list = []

    @functools.wraps(eager)
    def step(*args, **kwargs):
        if broken:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, an unsupported op...: eager still works
            broken.append(True)
            if not _warned:
                _warned.append(True)
                log.warning("train.compile=blocks: compiling a block failed (%s: %s); running blocks eagerly",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return eager(*args, **kwargs)

    block.step = step
