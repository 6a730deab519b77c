"""Autograd communication ops for tensor and sequence parallelism (Megatron's f/g operators).

Every op is the identity on one rank. Tensors are batch-first [b, s, ...]:
tensor-parallel splits act on the last dim, sequence-parallel ones on dim 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.parallel import state

SEQ_DIM = 1


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if state.tensor_size() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=state.tensor_group())
    return x


def _split(x: torch.Tensor, dim: int) -> torch.Tensor:
    n = state.tensor_size()
    if n == 1:
        return x
    if x.size(dim) % n:
        raise ValueError(f"cannot split dim {dim} of size {x.size(dim)} across {n} tensor-parallel ranks")
    return x.chunk(n, dim=dim)[state.tensor_rank()].contiguous()


def _gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    n = state.tensor_size()
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=state.tensor_group())
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    # gloo has no reduce_scatter; all-reduce + keep our chunk is exact and portable
    if state.tensor_size() == 1:
        return x
    return _split(_all_reduce(x.clone()), dim)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone())


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, g):
        return g


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _split(x, dim)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _gather(x, dim)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim), None


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence; backward reduce-scatters (the gathered copy fed a TP region)."""

    @staticmethod
    def forward(ctx, x):
        return _gather(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, SEQ_DIM)


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM)


def copy_to_tensor_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (also used on SP-replicated params)."""
    return x if state.tensor_size() == 1 else _Copy.apply(x)


def reduce_from_tensor_region(x: torch.Tensor) -> torch.Tensor:
    """All-reduce forward (partial sums of a row-parallel matmul), identity backward."""
    return x if state.tensor_size() == 1 else _Reduce.apply(x)


def scatter_to_tensor_region(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x if state.tensor_size() == 1 else _Scatter.apply(x, dim)


def gather_from_tensor_region(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x if state.tensor_size() == 1 else _Gather.apply(x, dim)


def scatter_to_sequence_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's sequence chunk; backward all-gathers (input was replicated)."""
    return x if state.tensor_size() == 1 else _Scatter.apply(x, SEQ_DIM)


def gather_from_sequence_region(x: torch.Tensor) -> torch.Tensor:
    """All-gather sequence chunks before a column-parallel layer; backward reduce-scatters."""
    return x if state.tensor_size() == 1 else _GatherSeq.apply(x)


def gather_sequence_no_reduce(x: torch.Tensor) -> torch.Tensor:
    """All-gather sequence chunks of a replicated computation; backward just splits."""
    return x if state.tensor_size() == 1 else _Gather.apply(x, SEQ_DIM)


def reduce_scatter_to_sequence_region(x: torch.Tensor) -> torch.Tensor:
    """Row-parallel partial sums -> summed sequence chunk; backward all-gathers."""
    return x if state.tensor_size() == 1 else _ReduceScatterSeq.apply(x)
