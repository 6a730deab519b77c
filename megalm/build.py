"""From a whole Config to this rank's model: the one place that reads training, parallel and objective
settings on the model's behalf (``megalm.model`` itself reads only ``ModelConfig`` and ``parallel.state``).

Weights come from ``train.seed`` by parameter name, recomputation from
``train.activation_checkpointing``, the query stream / binary head / pipeline
inputs from what the objective declares (``Objective.needs``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megalm.config import BUILTIN_OBJECTIVES, Config
from megalm.errors import ConfigError


def padded_vocab_size(vocab_size: int, cfg: Config) -> int:
    """Round up to a multiple of make_vocab_size_divisible_by x TP (Megatron's rule)."""
    from megalm.model import padded_vocab

    return padded_vocab(vocab_size, cfg.model, cfg.parallel.tensor)


def model_needs(cfg: Config):
    """What the configured objective asks of the model (``megalm.objectives.base.ModelNeeds``).

    A built-in objective of the other architecture (only tests build such configs; training refuses
    them) stands in for that architecture's own objective: MLM for BERT, CLM for GPT.
    """
    from megalm.objectives import objective_class

    name = cfg.objective.name
    if BUILTIN_OBJECTIVES.get(name, cfg.model.arch) != cfg.model.arch:
        name = "mlm" if cfg.model.arch == "bert" else "clm"
    return objective_class(name).needs(cfg)


def _check_layout(cfg: Config) -> None:
    from megalm.parallel import state

    p = cfg.parallel
    if p.tensor != state.tensor_size():
        raise ConfigError(
            f"parallel.tensor={p.tensor} but the parallel state has tensor size {state.tensor_size()}; "
            "call megalm.parallel.state.initialize(tensor, pipeline, sequence_parallel) first"
        )
    if (p.sequence_parallel and p.tensor > 1) != state.sequence_parallel():
        raise ConfigError(
            f"parallel.sequence_parallel={p.sequence_parallel} but the parallel state has sequence_parallel="
            f"{state.sequence_parallel()}; pass it to megalm.parallel.state.initialize"
        )


def build_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """This rank's shard of the model; call ``megalm.parallel.state.initialize`` first when TP > 1."""
    from megalm.model import make_model
    from megalm.model.recompute import apply_recompute

    _check_layout(cfg)
    needs = model_needs(cfg)
    model = make_model(cfg.model, vocab_size, padded_vocab_size(vocab_size, cfg), cfg.train.seed,
                       query_stream=needs.query_stream, binary_head=needs.binary_head)
    return apply_recompute(model, cfg.train.activation_checkpointing)


def pipeline_layers(cfg: Config, vocab_size: int, inputs: Optional[Sequence[str]] = None) -> list:
    """The model as a flat list of deepspeed.pipe LayerSpecs; ``inputs`` (default: the objective's) names the
    first stage's input tuple. Recomputation is applied to the built PipelineModule (``apply_recompute``)."""
    from megalm.model.pipeline import pipeline_layers as layers

    _check_layout(cfg)
    needs = model_needs(cfg)
    return layers(cfg.model, vocab_size, padded_vocab_size(vocab_size, cfg), tuple(inputs or needs.inputs),
                  cfg.train.seed, query_stream=needs.query_stream, binary_head=needs.binary_head)


def default_inputs(cfg: Config) -> tuple:
    """The names of the first pipeline stage's input tuple (= the model's keyword inputs) for ``cfg``'s objective."""
    return model_needs(cfg).inputs
