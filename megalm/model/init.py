"""Weight initialisation in one pass over parameter names: each full weight drawn from a seed derived from its
``build_model`` name, then cut to this rank's TP shard, so every TP degree and pipeline split starts identical.

Layers only allocate; this is the one place that decides distributions (GPT-2 / Megatron: normal(init_std),
residual output projections scaled by 1/sqrt(2 x layers), norms at one, biases at zero).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megalm.config import ModelConfig
from megalm.model.norms import Norm
from megalm.parallel import state
from megalm.parallel.layers import full_normal, param_seed, shard

# Parameters whose seed name predates the module layout (kept so existing runs start from the same weights).
SEED_NAMES = {"head.lm_dense.weight": "lm_head.dense.weight", "head.pooler.weight": "pooler.dense.weight",
              "head.binary_head.weight": "binary_head.weight"}
RESIDUAL_OUT = (".attention.out.weight", ".mlp.fc2.weight")


def full_init(name: str, p: nn.Parameter, owner: nn.Module, m: ModelConfig, vocab_size: int, seed: int
              ) -> torch.Tensor:
    """The full (TP=1) fp32 value of the parameter called ``name`` in build_model."""
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] = sum(p.partitions)
    if isinstance(owner, Norm):
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    if name.endswith("bias"):  # linear biases and BERT's lm_bias
        return torch.zeros(shape)
    rng = param_seed(seed, SEED_NAMES.get(name, name))
    if name.endswith("word.weight"):  # only the true vocabulary is drawn: padding rows stay zero
        full = torch.zeros(shape)
        full[:vocab_size] = full_normal((vocab_size, *shape[1:]), m.init_std, rng)
        return full
    std = m.init_std / (2.0 * m.num_layers) ** 0.5 if name.endswith(RESIDUAL_OUT) else m.init_std
    return full_normal(shape, std, rng)


@torch.no_grad()
def init_weights(module: nn.Module, m: ModelConfig, vocab_size: int, seed: int, prefix: str = "") -> nn.Module:
    """Fill every parameter of ``module``, whose names are build_model's after ``prefix`` (a pipeline layer's)."""
    owners = {id(p): mod for mod in module.modules() for p in mod.parameters(recurse=False)}
    rank, tp = state.tensor_rank(), state.tensor_size()
    for name, p in module.named_parameters():
        full = full_init(prefix + name, p, owners[id(p)], m, vocab_size, seed)
        if getattr(p, "tensor_model_parallel", False):
            full = shard(full, p.partition_dim, p.partitions, rank, tp)
        p.copy_(full)
    return module
