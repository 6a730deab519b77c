"""Permutation LM (XLNet): a random factorisation order per sample, two-stream attention, partial prediction.

The data-loader side draws each sample's order and hands the model its ranks
(``order_rank`` [b, s]); the model runs both streams by that order without
[s, s] masks (content: keys at or before the query in the order; query stream:
strictly before; ``megalm.model.two_stream``), and the ranks travel through the
pipeline like any other input. Only the last 1/``plm_k`` of each order is
predicted, from the query stream.
"""

from __future__ import annotations

import numpy as np
import torch

from megalm.errors import ConfigError
from megalm.model.two_stream import dense_masks
from megalm.objectives.base import ModelNeeds, Objective
from megalm.objectives.clm import masked_token_loss


def order_ranks(b: int, s: int, rng: np.random.Generator, span_lengths: np.ndarray | None = None) -> np.ndarray:
    """int64 [b, s]: each token's place in its sample's factorisation order (a permutation of 0..s-1).

    With ``span_lengths`` ([b, s], length of the span starting at each span
    index) the order permutes contiguous spans and keeps each span left to
    right, so a predicted span is predicted from its context, not from itself.
    """
    if span_lengths is None:
        keys = rng.random((b, s))
        return np.argsort(np.argsort(keys, axis=1), axis=1)
    ends = np.cumsum(span_lengths, axis=1)
    first = np.zeros((b, s), dtype=bool)
    first[:, 0] = True
    rows = np.broadcast_to(np.arange(b)[:, None], ends.shape)
    keep = ends < s
    first[rows[keep], ends[keep]] = True
    span_id = np.cumsum(first, axis=1) - 1
    span_key = np.take_along_axis(rng.random((b, s)), span_id, axis=1)
    pos = np.broadcast_to(np.arange(s), (b, s))
    order = np.lexsort((pos, span_key), axis=-1)  # by span key, then position
    return np.argsort(order, axis=1)


def two_stream_masks(rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(content_mask, query_mask), bool [b, 1, s, s]; True where query i may attend to key j (the dense form)."""
    return dense_masks(rank)


def num_predicted(seq_length: int, k: int) -> int:
    """How many tokens (the tail of the order) a sample predicts: 1/K of them, at least one."""
    return max(1, seq_length // k)


class PermutationLM(Objective):
    """XLNet's objective on the GPT model's two-stream path (``model.arch: gpt``, masks make it bidirectional)."""

    name = "plm"
    dataset_kind = "gpt"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        if cfg.model.arch != "gpt":
            raise ConfigError(
                f"objective.name=plm runs on the two-stream path of model.arch=gpt, got model.arch={cfg.model.arch!r}; "
                "its attention is set entirely by the factorisation order, so the backbone is bidirectional anyway"
            )
        o = cfg.objective
        if o.plm_span_order and o.max_span_length < 1:
            raise ConfigError(f"objective.max_span_length must be at least 1, got {o.max_span_length}")

    def collate(self, samples: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        o = self.cfg.objective
        s = self.cfg.model.seq_length
        tokens = np.stack([np.asarray(x["tokens"], dtype=np.int64)[:s] for x in samples])
        b, s = tokens.shape
        spans = rng.integers(1, o.max_span_length + 1, size=(b, s)) if o.plm_span_order else None
        rank = torch.from_numpy(order_ranks(b, s, rng, spans))
        target = rank >= s - num_predicted(s, o.plm_k)
        return {
            "input_ids": torch.from_numpy(tokens),
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
            "labels": torch.from_numpy(tokens),
            "loss_mask": target.to(torch.float32),
            "order_rank": rank,
        }

    @classmethod
    def needs(cls, cfg) -> ModelNeeds:  # noqa: ARG003 - the interface's signature; PLM's needs are fixed
        return ModelNeeds(inputs=("input_ids", "position_ids", "order_rank"), query_stream=True)

    def targets(self, batch):
        return batch["labels"], batch["loss_mask"]

    def loss(self, output, targets):
        return masked_token_loss(output, *targets)
