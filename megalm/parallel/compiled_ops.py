"""Optional fused kernels: small memory-bound functions (norm, activation, RoPE, loss) run through
torch.compile, which fuses each into one or two loops instead of many full-tensor passes.

Off until ``enable()``: training turns it on through the ``train.compile``
config key (``fused`` or ``blocks``, see megalm.model.compile), so the choice
is recorded in the run's config.yaml. The eager and compiled versions compute
the same math.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

log = logging.getLogger(__name__)

_STATE = {"enabled": False}


def enable(on: bool = True) -> None:
    _STATE["enabled"] = on


def enabled() -> bool:
    return _STATE["enabled"]


def fusable(fn: Callable) -> Callable:
    """``fn`` eagerly, or its torch.compile'd version once fused kernels are enabled."""
    compiled: list = []
    broken: list = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _STATE["enabled"] or broken:
            return fn(*args, **kwargs)
        if not compiled:
            import torch

            compiled.append(torch.compile(fn, dynamic=False))
        try:
            return compiled[0](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, unsupported op...: the eager path still works
            log.warning("fused kernel %s unavailable (%s: %s); using eager ops", fn.__name__, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            broken.append(True)
            return fn(*args, **kwargs)

    return wrapper
