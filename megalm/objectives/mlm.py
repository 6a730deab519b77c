"""Masked LM (BERT): mask a share of non-special tokens, predict them; plus the SOP/NSP binary head.

Masking runs in the data loader, vectorised over the micro-batch. Tokens are
grouped into units (a token, or a whole word with ``whole_word``), units into
spans (``span_masking``), and spans are drawn in random order until the
sample's budget of ``mask_prob`` x its non-special tokens is met (exact in
expectation). Each chosen
token then becomes [MASK] (80%), a random non-special token (10%) or stays (10%).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from megalm.errors import ConfigError
from megalm.objectives.base import ModelNeeds, Objective

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the rest stay unchanged


def special_ids(tokenizer: Any) -> np.ndarray:
    """Ids that are never masked and never drawn as random replacements (pad, unk, bos, eos, mask, cls, sep)."""
    names = ("pad", "unk", "bos", "eos", "mask", "cls", "sep")
    ids = {int(i) for i in (getattr(tokenizer, n, None) for n in names) if i is not None}
    return np.array(sorted(ids), dtype=np.int64)


def _starts_to_ids(starts: np.ndarray) -> np.ndarray:
    """Group id per token (0, 1, ... along each row) from a bool "starts a group" array."""
    return np.cumsum(starts, axis=1) - 1


def group_starts(tokens: np.ndarray, special: np.ndarray, word_start: np.ndarray | None, span_lengths: np.ndarray | None
                 ) -> np.ndarray:
    """bool [b, s]: where a maskable group (token, word, or span of either) begins.

    A special token is always a group of its own, and so the token after it
    starts a new group; ``span_lengths`` [b, s] gives the length in units of
    the span that starts at each unit (only the cumulative sums matter).
    """
    b, s = tokens.shape
    starts = np.ones((b, s), dtype=bool) if word_start is None else word_start.copy()
    starts[:, 0] = True
    starts |= special
    starts[:, 1:] |= special[:, :-1]
    if span_lengths is None:
        return starts
    unit = _starts_to_ids(starts)  # unit index of each token
    ends = np.cumsum(span_lengths, axis=1)  # unit index where each span after the first begins
    span_first = np.zeros((b, s + 1), dtype=bool)
    span_first[:, 0] = True
    rows = np.broadcast_to(np.arange(b)[:, None], ends.shape)
    keep = ends < s
    span_first[rows[keep], ends[keep]] = True
    out = starts & np.take_along_axis(span_first, unit, axis=1)
    out |= special
    out[:, 1:] |= special[:, :-1]
    return out


def choose_groups(starts: np.ndarray, maskable: np.ndarray, mask_prob: float, rng: np.random.Generator) -> np.ndarray:
    """bool [b, s]: the tokens chosen for prediction.

    Each row's budget is mask_prob x its maskable tokens, rounded at random so
    the expected rate is exact. Groups are taken in random order until the
    budget is reached; the group that would cross it is taken with the
    probability that keeps the expected count equal to the budget, so whole
    words and spans hit the configured rate on average too.
    """
    b, s = starts.shape
    gid = _starts_to_ids(starts)
    flat = gid + (np.arange(b) * s)[:, None]
    sizes = np.bincount(flat.ravel(), weights=maskable.ravel(), minlength=b * s).reshape(b, s)
    # a group is maskable as a whole: specials are groups of their own, so sizes counts only real tokens
    budget = np.floor(maskable.sum(axis=1) * mask_prob + rng.random(b))
    keys = rng.random((b, s))
    keys[sizes == 0] = np.inf
    order = np.argsort(keys, axis=1)
    sorted_sizes = np.take_along_axis(sizes, order, axis=1)
    before = np.cumsum(sorted_sizes, axis=1) - sorted_sizes
    # the group that crosses the budget is taken with probability (budget - before) / size: E[chosen] = budget
    take_sorted = (before + rng.random((b, s)) * sorted_sizes < budget[:, None]) & (sorted_sizes > 0)
    chosen_group = np.zeros((b, s), dtype=bool)
    np.put_along_axis(chosen_group, order, take_sorted, axis=1)
    return np.take_along_axis(chosen_group, gid, axis=1) & maskable


class MaskedLM(Objective):
    """BERT's MLM (+ ``objective.binary_head``: sop | nsp | none); loss = MLM mean + binary CE."""

    name = "mlm"
    dataset_kind = "bert_pair"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        o = cfg.objective
        if getattr(tokenizer, "mask", None) is None:
            raise ConfigError(
                f"objective.name=mlm needs a tokenizer with a <mask> piece; {getattr(tokenizer, 'model_path', '')} "
                "has none (train one with `megalm train-tokenizer`)"
            )
        if o.span_masking and o.max_span_length < 1:
            raise ConfigError(f"objective.max_span_length must be at least 1, got {o.max_span_length}")
        self.mask_id = int(tokenizer.mask)
        self.special = special_ids(tokenizer)
        vocab = int(tokenizer.vocab_size)
        self.replacements = np.setdiff1d(np.arange(vocab, dtype=np.int64), self.special)
        # Span lengths n in 1..max with p(n) proportional to 1/n (Megatron's and Google's n-gram masking).
        n = np.arange(1, max(o.max_span_length, 1) + 1)
        self.span_p = (1.0 / n) / (1.0 / n).sum()

    def mask_tokens(self, tokens: np.ndarray, maskable: np.ndarray, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(input ids after masking, bool chosen) for int64 [b, s] ``tokens``; non-maskable tokens never change."""
        o = self.cfg.objective
        b, s = tokens.shape
        special = ~maskable
        word_start = self.tokenizer.is_word_start(tokens) if o.whole_word else None
        spans = rng.choice(len(self.span_p), size=(b, s), p=self.span_p) + 1 if o.span_masking else None
        starts = group_starts(tokens, special, word_start, spans)
        chosen = choose_groups(starts, maskable, o.mask_prob, rng)
        r = rng.random((b, s))
        random_ids = self.replacements[rng.integers(0, len(self.replacements), size=(b, s))]
        out = tokens.copy()
        out = np.where(chosen & (r < MASK_SHARE), self.mask_id, out)
        out = np.where(chosen & (r >= MASK_SHARE) & (r < MASK_SHARE + RANDOM_SHARE), random_ids, out)
        return out, chosen

    def collate(self, samples: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        tokens = np.stack([np.asarray(x["tokens"], dtype=np.int64) for x in samples])
        types = np.stack([np.asarray(x["token_types"], dtype=np.int64) for x in samples])
        lengths = np.array([int(x["length"]) for x in samples])
        padding = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        maskable = padding & ~np.isin(tokens, self.special)
        input_ids, chosen = self.mask_tokens(tokens, maskable, rng)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(types),
            "padding_mask": torch.from_numpy(padding),
            "labels": torch.from_numpy(tokens),
            "loss_mask": torch.from_numpy(chosen.astype(np.float32)),
            "binary_labels": torch.tensor([int(x["is_random"]) for x in samples], dtype=torch.int64),
        }

    @classmethod
    def needs(cls, cfg) -> ModelNeeds:
        return ModelNeeds(inputs=("input_ids", "token_type_ids", "padding_mask"),
                          binary_head=cfg.objective.binary_head != "none")

    def targets(self, batch):
        return batch["labels"], batch["loss_mask"], batch["binary_labels"]

    def _parts(self, output, targets) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy

        logits, binary = (output[0], output[1] if len(output) > 1 else None) if isinstance(output, (tuple, list)) \
            else (output, None)
        labels, loss_mask, binary_labels = targets
        per_token = vocab_parallel_cross_entropy(logits, labels)
        mask = loss_mask.to(per_token.dtype)
        mlm = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        if binary is None or self.cfg.objective.binary_head == "none":
            return mlm, None, None
        return mlm, F.cross_entropy(binary.float(), binary_labels), binary

    def loss(self, output, targets):
        mlm, binary_loss, _ = self._parts(output, targets)
        return mlm if binary_loss is None else mlm + binary_loss

    @torch.no_grad()
    def metrics(self, output, targets) -> dict[str, torch.Tensor]:
        mlm, binary_loss, binary = self._parts(output, targets)
        out = {"mlm_loss": mlm.detach()}
        if binary_loss is not None:
            out["binary_loss"] = binary_loss.detach()
            out["binary_acc"] = (binary.argmax(-1) == targets[2]).float().mean()
        return out
