"""The model family built from megalm.parallel layers: GPT (decoder), BERT (encoder), PLM two-stream hooks.

``build_model`` gives a plain nn.Module; ``pipeline_layers`` the same model as
a flat list of DeepSpeed LayerSpecs. Both draw every weight from
``cfg.train.seed`` by parameter name, so they (and any TP degree) agree.
"""

from __future__ import annotations

import torch

from megalm.config import Config
from megalm.errors import ConfigError


def padded_vocab_size(vocab_size: int, cfg: Config) -> int:
    """Round up to a multiple of make_vocab_size_divisible_by x TP (Megatron's rule)."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor
    return ((vocab_size + multiple - 1) // multiple) * multiple


def build_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """This rank's shard of the model; call ``megalm.parallel.state.initialize`` first when TP > 1."""
    from megalm.parallel import state

    if cfg.parallel.tensor != state.tensor_size():
        raise ConfigError(
            f"parallel.tensor={cfg.parallel.tensor} but the parallel state has tensor size {state.tensor_size()}; "
            "call megalm.parallel.state.initialize(tensor, pipeline) first"
        )
    padded = padded_vocab_size(vocab_size, cfg)
    if cfg.model.arch == "gpt":
        from megalm.model.gpt import GPTModel

        return GPTModel(cfg, vocab_size, padded)
    if cfg.model.arch == "bert":
        from megalm.model.bert import BertModel

        return BertModel(cfg, vocab_size, padded)
    raise ConfigError(f"model.arch must be gpt or bert, got {cfg.model.arch!r}")


def pipeline_layers(cfg: Config, vocab_size: int, inputs=None) -> list:
    """The model as a flat list of deepspeed.pipe LayerSpec/TiedLayerSpec (see megalm.model.pipeline)."""
    from megalm.model.pipeline import pipeline_layers as _impl

    return _impl(cfg, vocab_size, inputs)


__all__ = ["build_model", "padded_vocab_size", "pipeline_layers"]
