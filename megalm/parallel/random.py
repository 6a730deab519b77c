"""Tensor-parallel-aware RNG: dropout identical where activations are replicated, distinct where split.

The default generator is seeded the same on every TP rank (replicated regions) and
differently per pipeline stage; the tracker holds a second state, seeded per TP rank, forked for dropout on
split activations (attention heads, sequence-parallel chunks). ``checkpoint``
recomputes a function with both states rewound, so dropout masks reproduce.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch.utils.checkpoint

from megalm.parallel import state

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718
_PP_SEED_OFFSET = 100  # Megatron's per-pipeline-stage offset


def _device_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def _set_device_state(device: str, s: torch.Tensor) -> None:
    if device == "cuda":
        torch.cuda.set_rng_state(s)
    else:
        torch.set_rng_state(s)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"


class RNGStatesTracker:
    """Named generator states swapped into the default generator inside ``fork``."""

    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.device = "cpu"  # the generator the states belong to, fixed when they are seeded

    def reset(self, device: Optional[str] = None) -> None:
        self.states = {}
        self.device = device or _device()

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        self.states[name] = torch.Generator(device=self.device).manual_seed(seed).get_state()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self.states:  # not seeded: behave like one rank, use the default stream
            yield
            return
        dev = self.device
        saved = _device_state(dev)
        _set_device_state(dev, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _device_state(dev)
            _set_device_state(dev, saved)


_TRACKER = RNGStatesTracker()


def get_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, device: Optional[str] = None) -> None:
    """Seed the default generator (same on all TP ranks) and the per-TP-rank tracked state.

    Both are offset by the pipeline rank, as Megatron does: otherwise every stage would draw the same
    dropout masks for its blocks. Stage 0 keeps ``seed`` itself, so PP=1 runs are unchanged.
    ``device`` ("cpu" or "cuda") is where dropout will run; default: cuda once CUDA is initialised.
    """
    seed = seed + _PP_SEED_OFFSET * state.pipeline_rank()
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    _TRACKER.reset(device)
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + state.tensor_rank())


def _capture() -> tuple:
    dev = _TRACKER.device if _TRACKER.states else _device()
    return dev, _device_state(dev), _TRACKER.get_states()


def _restore(snap: tuple) -> None:
    dev, s, tracked = snap
    _set_device_state(dev, s)
    _TRACKER.set_states(tracked)


def checkpoint(fn: Callable, *args: Any) -> Any:
    """Activation checkpointing that rewinds the default *and* tracked RNG states on recompute.

    Non-reentrant, so inputs that need no grad (ids, masks) are fine.
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    snaps: list = []

    def run(*a: Any) -> Any:
        if not snaps:  # the first (forward) pass: remember where the streams stood
            snaps.append(_capture())
            return fn(*a)
        now = _capture()
        _restore(snaps[0])
        try:
            return fn(*a)
        finally:
            _restore(now)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False)
