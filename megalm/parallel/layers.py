"""Column/row-parallel linear layers and the vocab-parallel embedding.

Each rank holds a slice of a *full* weight; the model's one init pass
(``megalm.model.init``) draws the full weight from a seed and cuts it, so a
model starts identical whatever the TP degree. Layers allocate only. Split params
carry the attributes DeepSpeed 0.19 reads (``tensor_model_parallel``,
``model_parallel``: counted on every TP rank in grad norms) plus ours
(``partition_dim``, ``partitions``) for the full<->shard helpers.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.parallel import state
from megalm.parallel.mappings import (
    copy_to_tensor_region,
    gather_from_sequence_region,
    gather_from_tensor_region,
    reduce_from_tensor_region,
    reduce_scatter_to_sequence_region,
)


def param_seed(base_seed: int, name: str) -> int:
    """A stable per-parameter seed from the run seed and the parameter's logical name."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def full_normal(shape: Sequence[int], std: float, seed: Optional[int]) -> torch.Tensor:
    """The full (unsplit) fp32 weight; the same on every rank for a given seed."""
    out = torch.empty(*shape, dtype=torch.float32)
    if seed is None:
        return out.normal_(0.0, std)
    gen = torch.Generator().manual_seed(seed)
    return out.normal_(0.0, std, generator=gen)


def shard(full: torch.Tensor, dim: int, partitions: Sequence[int], rank: int, size: int) -> torch.Tensor:
    """This rank's slice: each partition (e.g. Q, K, V of a fused QKV) is split separately."""
    if size == 1:
        return full
    pieces = full.split(list(partitions), dim=dim)
    out = []
    for p in pieces:
        if p.size(dim) % size:
            raise ValueError(f"partition of size {p.size(dim)} is not divisible by tensor-parallel size {size}")
        out.append(p.chunk(size, dim=dim)[rank])
    return torch.cat(out, dim=dim).contiguous()


def unshard(shards: Sequence[torch.Tensor], dim: int, partitions: Sequence[int]) -> torch.Tensor:
    """Inverse of ``shard``: rebuild the full tensor from every rank's slice (rank order)."""
    size = len(shards)
    if size == 1:
        return shards[0]
    local = [p // size for p in partitions]
    split = [s.split(local, dim=dim) for s in shards]
    return torch.cat([torch.cat([split[r][i] for r in range(size)], dim=dim) for i in range(len(partitions))],
                     dim=dim)


def mark_tensor_parallel(p: nn.Parameter, dim: int, partitions: Sequence[int]) -> None:
    p.tensor_model_parallel = True
    p.model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1
    p.partitions = tuple(int(x) for x in partitions)


def _sp(flag: Optional[bool]) -> bool:
    return state.sequence_parallel() if flag is None else flag


def mark_sequence_parallel(p: nn.Parameter) -> None:
    """A replicated param used on sequence chunks; its grad is all-reduced over TP inside autograd."""
    p.sequence_parallel = True


class ColumnParallelLinear(nn.Module):
    """Y = X A^T with A split by rows (output features) across TP ranks.

    ``partitions`` lists the full sizes of fused outputs (e.g. [q, k, v] or
    [gate, up]) so each rank gets its slice of every part. With
    ``sequence_parallel`` the input is a sequence chunk, all-gathered here.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 partitions: Optional[Sequence[int]] = None, sequence_parallel: Optional[bool] = None) -> None:
        super().__init__()
        tp = state.tensor_size()
        partitions = tuple(partitions or (out_features,))
        if sum(partitions) != out_features:
            raise ValueError(f"partitions {partitions} do not add up to out_features {out_features}")
        if any(p % tp for p in partitions):
            raise ValueError(f"partitions {partitions} are not divisible by tensor-parallel size {tp}")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, _sp(sequence_parallel)
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features))
        mark_tensor_parallel(self.weight, 0, partitions)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features // tp))
            mark_tensor_parallel(self.bias, 0, partitions)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
        """``rows``: only this rank's first ``rows`` output features (e.g. the q of a fused q, k, v)."""
        x = gather_from_sequence_region(x) if self.sequence_parallel else copy_to_tensor_region(x)
        if rows is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight[:rows], None if self.bias is None else self.bias[:rows])
        return gather_from_tensor_region(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T with A split by columns (input features); partial sums reduced, bias added once after."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 sequence_parallel: Optional[bool] = None) -> None:
        super().__init__()
        tp = state.tensor_size()
        if in_features % tp:
            raise ValueError(f"in_features {in_features} is not divisible by tensor-parallel size {tp}")
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = _sp(sequence_parallel)
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp))
        mark_tensor_parallel(self.weight, 1, (in_features,))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
            if self.sequence_parallel:
                mark_sequence_parallel(self.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence_region(y) if self.sequence_parallel else reduce_from_tensor_region(y)
        if self.bias is not None:
            bias = copy_to_tensor_region(self.bias) if self.sequence_parallel else self.bias
            y = y + bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; ids outside this rank's range contribute zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int, sequence_parallel: Optional[bool] = None) -> None:
        super().__init__()
        tp, rank = state.tensor_size(), state.tensor_rank()
        if num_embeddings % tp:
            raise ValueError(f"vocabulary {num_embeddings} is not divisible by tensor-parallel size {tp}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel = _sp(sequence_parallel)
        per = num_embeddings // tp
        self.vocab_start, self.vocab_end = rank * per, (rank + 1) * per
        self.weight = nn.Parameter(torch.empty(per, embedding_dim))
        mark_tensor_parallel(self.weight, 0, (num_embeddings,))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if state.tensor_size() == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sequence_region(out) if self.sequence_parallel else reduce_from_tensor_region(out)
