"""Optional fused kernels: small memory-bound functions (norm, activation, RoPE, loss) run through
torch.compile, which fuses each into one or two loops instead of many full-tensor passes.

Off by default (compiling costs ~10 s per function once); turn on with
``enable()`` or ``MEGALM_FUSED_KERNELS=1``. The eager and compiled versions
compute the same math; tests run eager.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

log = logging.getLogger(__name__)

_STATE = {"enabled": os.environ.get("MEGALM_FUSED_KERNELS", "0") not in ("", "0", "false")}


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
