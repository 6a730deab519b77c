"""The model family built from megalm.parallel layers: GPT (decoder), BERT (encoder), PLM two-stream path.

Everything here reads only ``ModelConfig`` and the layout in ``megalm.parallel.state``
(TP degree, sequence parallelism). What an objective asks of the model (a query
stream, a binary head, the pipeline's inputs) comes in as arguments; the seed
and recomputation are applied from outside (``init_weights``, ``apply_recompute``).
``megalm.build`` turns a whole Config into these calls.
"""

from __future__ import annotations

import torch

from megalm.config import ModelConfig
from megalm.errors import ConfigError


def padded_vocab(vocab_size: int, m: ModelConfig, tensor: int) -> int:
    """Round up to a multiple of make_vocab_size_divisible_by x TP (Megatron's rule)."""
    multiple = m.make_vocab_size_divisible_by * tensor
    return ((vocab_size + multiple - 1) // multiple) * multiple


def make_model(m: ModelConfig, vocab_size: int, padded: int, seed: int, query_stream: bool = False,
               binary_head: bool = False) -> torch.nn.Module:
    """This rank's shard of the model, weights drawn from ``seed`` by parameter name."""
    from megalm.model.init import init_weights

    if m.arch == "gpt":
        from megalm.model.gpt import GPTModel

        return init_weights(GPTModel(m, vocab_size, padded, query_stream), m, vocab_size, seed)
    if m.arch == "bert":
        from megalm.model.bert import BertModel

        return init_weights(BertModel(m, vocab_size, padded, binary_head), m, vocab_size, seed)
    raise ConfigError(f"model.arch must be gpt or bert, got {m.arch!r}")


__all__ = ["make_model", "padded_vocab"]
