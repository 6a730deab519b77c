"""A global gradient norm that is right under any TP x PP layout, and clipping by it.

DeepSpeed's fp32 path without ZeRO counts replicated parameters only on
"model-parallel rank 0", which under the pipeline grid means only the first
stage (see ../shared/notes: 3.79 vs the true 3.88), and it discards the norm it
computes. megalm clips in that mode itself: each parameter counts once per
replica — TP shards on every TP rank, replicated weights on TP rank 0, tied
pipeline copies (ds_pipe_replicated) on their owner stage only. The sum of
squares stays on the gradients' device and is reduced there: one host sync per step.
"""

from __future__ import annotations

from typing import Iterable

import torch

from megalm.parallel import comm
from megalm.training import ds_state


def counts_once(p: torch.nn.Parameter, tensor_rank: int) -> bool:
    if ds_state.is_pipe_replicated(p):
        return False
    return bool(getattr(p, "tensor_model_parallel", False)) or tensor_rank == 0


@torch.no_grad()
def global_sq_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The replica's sum of squared gradients as a float64 tensor on the comm device (no host sync)."""
    from megalm.parallel import state

    tp_rank = state.tensor_rank()
    group = state.model_group()
    grads = [p.grad.detach() for p in params if p.grad is not None and counts_once(p, tp_rank)]
    dev = comm.device(group)
    if grads:
        total = torch.stack(torch._foreach_norm(grads, 2.0)).double().pow(2).sum().reshape(1).to(dev)
    else:
        total = torch.zeros(1, dtype=torch.float64, device=dev)
    return comm.all_reduce(total, "sum", group)


def global_grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    return float(global_sq_norm(params).sqrt().item())


@torch.no_grad()
def clip_(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Scale gradients so their global norm is at most ``max_norm`` (0 = measure only); return the norm."""
    norm = global_grad_norm(params)
    if max_norm > 0 and norm > max_norm:
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm
