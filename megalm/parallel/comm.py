"""Collectives on small control values (flags, scalar means, norms), always on the group's communication device.

NCCL serves CUDA tensors only ("No backend type associated with device type
cpu"), gloo CPU tensors; a ``cpu:gloo,cuda:nccl`` group serves both. Every
collective megalm runs outside the autograd mappings (which move activations
already on the training device) goes through this module, so no call site
builds a tensor on the wrong device. ``tests/parallel/test_comm.py`` checks that.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def active(group: Any = None) -> bool:
    """True when a collective over ``group`` would involve another rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def device(group: Any = None) -> torch.device:
    """Where a tensor must live to enter a collective of ``group``: CUDA when NCCL serves it, else the CPU.

    A mixed group (``cpu:gloo,cuda:nccl``) takes both; its CUDA side is preferred, because the values
    megalm reduces (losses, norms) are computed there and the CPU side would cost a copy each way.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _op(op: str) -> Any:
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduction {op!r}; use one of {sorted(_OPS)} or 'mean'") from None


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """Reduce ``tensor`` over ``group`` (op: sum, max, min, mean); returns the result on the comm device.

    The input is copied there first when it lives elsewhere, and is never modified in place.
    """
    dev = device(group)
    out = tensor.detach().to(dev, copy=True)
    if not active(group):
        return out
    dist.all_reduce(out, op=_op("sum" if op == "mean" else op), group=group)
    if op == "mean":
        out /= dist.get_world_size(group)
    return out


def reduce_scalar(value: Union[float, torch.Tensor], op: str = "sum", group: Any = None) -> float:
    """One number reduced over ``group``, returned as a Python float (one device sync)."""
    t = value.detach().reshape(1).float() if torch.is_tensor(value) else torch.tensor([float(value)])
    return float(all_reduce(t, op, group).item())


def any_rank(flag: Union[bool, torch.Tensor], group: Any = None) -> bool:
    """True on every rank of ``group`` when ``flag`` (a bool or a bool tensor, e.g. on the GPU) is true on any."""
    value = flag.any().float() if torch.is_tensor(flag) else (1.0 if flag else 0.0)
    return reduce_scalar(value, "max", group) > 0


def broadcast_(tensor: torch.Tensor, src: int, group: Any = None) -> torch.Tensor:
    """Overwrite ``tensor`` with global rank ``src``'s copy, staging through the comm device if needed."""
    if not active(group):
        return tensor
    dev = device(group)
    staged = tensor if tensor.device == dev else tensor.to(dev)
    dist.broadcast(staged, src=src, group=group)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def all_gather_object(obj: Any, group: Any = None) -> list:
    """Every rank's ``obj`` (picklable), in rank order; [obj] without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: Optional[Any] = None) -> None:
    """Wait for every rank of ``group`` (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
