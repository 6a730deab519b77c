"""BERT-pair samples from sentence-split data: [CLS] A [SEP] B [SEP] for MLM + SOP or NSP.

Samples are runs of consecutive sentences of one document, packed greedily up
to a target length (sometimes shorter, ``short_seq_prob``, as BERT does); the
run is cut at a random sentence into A and B. SOP swaps A and B with
probability 1/2; NSP replaces B by sentences of another document. Masking is
the MLM objective's job, not the dataset's. The sample index is cached like
the GPT one; per-sample randomness is seeded by (seed + index), so a sample
is the same on every rank and after every restart.
"""

from __future__ import annotations

import logging
import os
import typing
from typing import Any, Optional, Union

import numpy as np

from megalm.config import BinaryHead
from megalm.data.cache import cached_arrays, description_hash
from megalm.data.indexed import IndexedDataset
from megalm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BINARY_HEADS = typing.get_args(BinaryHead)


def build_pair_samples(doc_indices: np.ndarray, sent_lengths: np.ndarray, docs: range, num_samples: Optional[int],
                       max_tokens: int, short_seq_prob: float, seed: int, min_sentences: int) -> np.ndarray:
    """Rows (first sentence, end sentence, target length) over ``docs``; epochs until ``num_samples``; shuffled."""
    rng = np.random.RandomState(seed)
    doc_idx = doc_indices.tolist() if len(doc_indices) < 50_000_000 else doc_indices
    lengths = sent_lengths.tolist()
    rows: list[tuple[int, int, int]] = []
    epoch = 0
    while True:
        before = len(rows)
        for d in docs:
            first, end = int(doc_idx[d]), int(doc_idx[d + 1])
            if end - first < min_sentences:
                continue
            target = max_tokens if rng.random_sample() >= short_seq_prob else int(rng.randint(2, max_tokens + 1))
            start, acc = first, 0
            for s in range(first, end):
                acc += lengths[s]
                if acc >= target or s == end - 1:
                    if s + 1 - start >= min_sentences:
                        rows.append((start, s + 1, target))
                    start, acc = s + 1, 0
                    target = max_tokens if rng.random_sample() >= short_seq_prob else int(rng.randint(2, max_tokens + 1))
        epoch += 1
        if len(rows) == before:
            raise DataError(f"no document in the split has {min_sentences}+ sentences; "
                            "BERT-pair data needs `preprocess --split-sentences`")
        if num_samples is None or len(rows) >= num_samples:
            break
    out = np.array(rows, dtype=np.int64)
    rng.shuffle(out)
    log.info("BERT pairs: %d samples over %d epoch(s)", len(out), epoch)
    return out


class BertPairDataset:
    """``ds[i]`` -> {"tokens", "token_types": int64[max_seq_length], "is_random": int64 label, "length": int}.

    ``tokens`` is [CLS] A [SEP] B [SEP] padded with pad; ``token_types`` is 0 on
    [CLS] A [SEP], 1 on B [SEP], 0 on padding; ``length`` counts real tokens.
    ``is_random`` is 1 when B was swapped (SOP) or drawn from another document
    (NSP), always 0 for ``binary_head="none"``.
    """

    def __init__(self, prefix_or_indexed: Union[str, IndexedDataset], split_name: str,
                 index_split: tuple[int, int], num_samples: Optional[int], max_seq_length: int, seed: int,
                 cache_dir: Optional[str], tokenizer: Any, binary_head: str = "sop",
                 short_seq_prob: float = 0.1) -> None:
        if binary_head not in BINARY_HEADS:
            raise ConfigError(f"binary_head must be one of {', '.join(BINARY_HEADS)}, got {binary_head!r}")
        self.indexed = (prefix_or_indexed if isinstance(prefix_or_indexed, IndexedDataset)
                        else IndexedDataset(prefix_or_indexed))
        for name in ("cls", "sep", "pad"):
            if getattr(tokenizer, name, None) is None:
                raise DataError(f"tokenizer {getattr(tokenizer, 'model_path', '')} has no <{name}> piece; "
                                "BERT pairs need cls, sep and pad (train one with `megalm train-tokenizer`)")
        self.cls, self.sep, self.pad = tokenizer.cls, tokenizer.sep, tokenizer.pad
        self.split_name = split_name
        self.max_seq_length = int(max_seq_length)
        if self.max_seq_length < 5:
            raise DataError(f"max_seq_length must be at least 5, got {max_seq_length}")
        self.seed = int(seed)
        self.binary_head = binary_head
        lo, hi = int(index_split[0]), int(index_split[1])
        if not 0 <= lo <= hi <= self.indexed.num_documents:
            raise DataError(f"document range {index_split} outside [0, {self.indexed.num_documents}]")
        self.docs = range(lo, hi)
        max_tokens = self.max_seq_length - 3
        min_sents = 2 if binary_head != "none" else 1
        idx = self.indexed
        description = {
            "class": "BertPairDataset", "dataset_path": os.path.abspath(idx.path_prefix),
            "dataset_fingerprint": [len(idx), idx.num_documents, idx.num_tokens, str(idx.dtype), idx.fingerprint()],
            "num_samples": num_samples, "index_split": split_name, "documents": [lo, hi], "random_seed": self.seed,
            "max_seq_length": self.max_seq_length, "short_seq_prob": short_seq_prob, "min_sentences": min_sents,
        }
        self.cache_key = description_hash(description)[1]
        arrays = cached_arrays(
            cache_dir, f"BertPairDataset-{split_name}", description,
            lambda: {"samples": build_pair_samples(idx.document_indices, idx.sequence_lengths, self.docs,
                                                   num_samples, max_tokens, short_seq_prob, self.seed, min_sents)},
        )
        self.samples = arrays["samples"]

    def __len__(self) -> int:
        return len(self.samples)

    def _random_other(self, rng: np.random.RandomState, doc_of_a: int, want: int) -> list[np.ndarray]:
        """Sentences from a random other document of the split, about ``want`` tokens (NSP's random B)."""
        di = self.indexed.document_indices
        for _ in range(10):
            d = self.docs[int(rng.randint(len(self.docs)))]
            if d != doc_of_a and di[d + 1] > di[d]:
                break
        first, end = int(di[d]), int(di[d + 1])
        if end == first:
            return []
        s = int(rng.randint(first, end))
        out, acc = [], 0
        while s < end and acc < want:
            out.append(self.indexed[s])
            acc += len(out[-1])
            s += 1
        return out

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range ({n} samples)")
        start, end, target = (int(x) for x in self.samples[i])
        rng = np.random.RandomState((self.seed + i) % 2**32)
        sents = [self.indexed[s] for s in range(start, end)]
        is_random = 0
        if self.binary_head == "none":
            a, b = sents, []
        else:
            a_end = int(rng.randint(1, len(sents))) if len(sents) >= 3 else 1
            a, b = sents[:a_end], sents[a_end:]
            if rng.random_sample() < 0.5:
                is_random = 1
                if self.binary_head == "sop":
                    a, b = b, a
                else:
                    doc = int(np.searchsorted(self.indexed.document_indices, start, side="right") - 1)
                    want = max(target - sum(len(x) for x in a), 1)
                    b = self._random_other(rng, doc, want) or b
        ta = np.concatenate(a).astype(np.int64) if a else np.empty(0, np.int64)
        tb = np.concatenate(b).astype(np.int64) if b else np.empty(0, np.int64)
        ta, tb = _truncate_pair(ta, tb, target, rng)
        L = self.max_seq_length
        tokens = np.full(L, self.pad, dtype=np.int64)
        types = np.zeros(L, dtype=np.int64)
        k = 0
        tokens[k] = self.cls
        k += 1
        tokens[k:k + len(ta)] = ta
        k += len(ta)
        tokens[k] = self.sep
        k += 1
        if len(tb):
            tokens[k:k + len(tb)] = tb
            types[k:k + len(tb) + 1] = 1
            k += len(tb)
            tokens[k] = self.sep
            k += 1
        return {"tokens": tokens, "token_types": types, "is_random": np.int64(is_random), "length": k}


def _truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.RandomState):
    """Trim the longer side one token at a time, from its front or back at random (BERT's rule)."""
    budget = max_tokens - (0 if len(b) else -1)  # without B there is one [SEP] fewer
    a_lo, a_hi, b_lo, b_hi = 0, len(a), 0, len(b)
    while (a_hi - a_lo) + (b_hi - b_lo) > budget:
        if (a_hi - a_lo) > (b_hi - b_lo):
            if rng.random_sample() < 0.5:
                a_lo += 1
            else:
                a_hi -= 1
        else:
            if rng.random_sample() < 0.5:
                b_lo += 1
            else:
                b_hi -= 1
    return a[a_lo:a_hi], b[b_lo:b_hi]
