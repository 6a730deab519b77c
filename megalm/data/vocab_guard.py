"""Refuse token ids the model's vocabulary cannot hold, naming the dataset, sample and document.

Data tokenized with a larger tokenizer than ``model.vocab_size`` fails at TP=1 with an IndexError deep
in the embedding, and at TP>1 silently: the vocab-parallel embedding turns out-of-range ids into zero
vectors (or trains a padding row) and the loss reads their targets as 0. Each sample is checked as it
is fetched (a min and a max over seq_length ids), before its batch reaches any model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megalm.errors import DataError


def locate(dataset: Any, i: int) -> str:
    """Where sample ``i`` of ``dataset`` comes from: its .bin/.idx prefix, split and documents."""
    if hasattr(dataset, "dataset_index") and hasattr(dataset, "datasets"):  # a blend: name the member
        d, j = int(dataset.dataset_index[i]), int(dataset.dataset_sample_index[i])
        return f"{locate(dataset.datasets[d], j)} (member {d} of the blend, blended sample {i})"
    indexed = getattr(dataset, "indexed", None)
    prefix = getattr(indexed, "path_prefix", None) or type(dataset).__name__
    split = getattr(dataset, "split_name", "")
    where = f"dataset {prefix}.bin/.idx ({split} split), sample {i}"
    try:
        if hasattr(dataset, "sample_index"):  # GPT: the sequences (documents) the sample spans
            j = int(dataset.shuffle_index[i])
            b, e = int(dataset.sample_index[j][0]), int(dataset.sample_index[j + 1][0])
            seqs = sorted({int(s) for s in dataset.document_index[b:e + 1]})
            return f"{where}, made of sequence(s) {', '.join(map(str, seqs))} of the .idx"
        if hasattr(dataset, "samples") and indexed is not None:  # BERT pairs: a sentence range of one document
            start, end = int(dataset.samples[i][0]), int(dataset.samples[i][1])
            doc = int(np.searchsorted(indexed.document_indices, start, side="right") - 1)
            return f"{where}, sentences {start}..{end - 1} of document {doc}"
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    return where


class VocabGuard:
    """``guard(i, sample)`` raises DataError when a token id of ``sample['tokens']`` is outside [0, vocab_size)."""

    def __init__(self, dataset: Any, vocab_size: int) -> None:
        self.dataset, self.vocab_size = dataset, int(vocab_size)

    def __call__(self, i: int, sample: dict) -> None:
        tokens = sample.get("tokens") if isinstance(sample, dict) else None
        if tokens is None or len(tokens) == 0:
            return
        top, low = int(np.max(tokens)), int(np.min(tokens))
        if top < self.vocab_size and low >= 0:
            return
        bad = top if top >= self.vocab_size else low
        raise DataError(
            f"{locate(self.dataset, i)} holds token id {bad}, outside model.vocab_size={self.vocab_size}: the data "
            f"was tokenized with a different (larger) vocabulary. Re-run megalm preprocess with the tokenizer in "
            f"data.tokenizer, or point data.tokenizer at the one the data was made with (and set model.vocab_size "
            f"to at least {top + 1} if the model should cover it)."
        )
