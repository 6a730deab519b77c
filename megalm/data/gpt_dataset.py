"""GPT samples: seq_length+1 tokens cut from shuffled, concatenated documents (Megatron-LM semantics).

The three indices (document, sample, shuffle) equal Megatron-LM's for the same
inputs and seed, built vectorised in numpy (no per-sample Python loop, no C++
helper) and cached via megalm.data.cache. Samples carry ``segment_ids`` so the
CLM objective can do EOD loss masking, position reset and per-document
attention without a dense mask.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Optional, Union

import numpy as np

from megalm.data.cache import cached_arrays, description_hash
from megalm.data.indexed import IndexedDataset
from megalm.errors import DataError

log = logging.getLogger(__name__)

# Megatron: a final epoch that supplies fewer than this fraction of an epoch's samples is shuffled apart.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


# ---------------------------------------------------------------- index builders

def num_epochs_needed(tokens_per_epoch: int, num_samples: Optional[int], seq_length: int, extra: int = 1) -> int:
    """Smallest E with E*tokens_per_epoch >= num_samples*seq_length + extra."""
    if num_samples is None:
        return 1
    need = num_samples * seq_length + extra
    return max(1, -(-need // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """``documents`` tiled ``num_epochs`` times (int32) and shuffled; the final epoch apart if asked."""
    if separate_final_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        last = build_document_index(documents, 1, rng, False)
        return np.concatenate((first, last))
    doc_index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(doc_index)
    return doc_index


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_epochs: int,
                       tokens_per_epoch: int, drop_last_partial: bool = True, extra: int = 1) -> np.ndarray:
    """Rows ``(position in document_index, token offset)`` where each sample starts; shape [num_samples+1, 2].

    Sample k starts at global token ``k*seq_length`` of the concatenated
    documents; its row names the document holding its *last* token of the
    previous sample (so a sample ending exactly at a document's end starts the
    next one at that document's last token, as Megatron's helper does).
    """
    total = num_epochs * tokens_per_epoch
    if drop_last_partial:
        num_samples = (total - extra) // seq_length
    else:  # Megatron's helper computes this in single precision
        num_samples = int(math.ceil(np.float32(np.float32(total - extra) / np.float32(seq_length))))
    n_docs = len(document_index)
    imax = max(n_docs, int(sizes.max()) if len(sizes) else 0)
    dtype = np.int32 if imax <= np.iinfo(np.int32).max else np.int64
    doc_lengths = sizes[document_index]
    ends = np.cumsum(doc_lengths, dtype=np.int64)  # ends[j] = tokens up to and including doc j
    del doc_lengths
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # the document containing token (start + extra - 1): first j with ends[j] > that token
    probe = starts + (extra - 1)
    pos = np.searchsorted(ends, probe, side="right")
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    past = pos >= n_docs
    pos_c = np.minimum(pos, n_docs - 1)
    doc_begin = ends[pos_c] - sizes[document_index[pos_c]]
    offset = starts - doc_begin
    if past.any():  # only the last row of a non-dropped partial sample can run past the end
        offset[past] = int(sizes[document_index[n_docs - 1]]) - extra
    out[:, 0] = pos_c
    out[:, 1] = offset
    out[0] = (0, 0)  # Megatron starts at (0, 0) even if that document is empty
    return out


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """arange shuffled; ``[num_samples, total_size)`` shuffled separately when it is not empty."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(sizes: np.ndarray, indices: np.ndarray, num_samples: Optional[int], seq_length: int,
                      seed: int, drop_last_partial: bool = True, extra: int = 1) -> dict[str, np.ndarray]:
    """Document, sample and shuffle index for the sequences ``indices`` of a dataset with ``sizes``."""
    if len(indices) == 0:
        raise DataError("cannot build a GPT dataset over an empty split (no sequences)")
    tokens_per_epoch = int(np.sum(sizes[indices], dtype=np.int64))
    if tokens_per_epoch <= 1:
        raise DataError(f"the split holds only {tokens_per_epoch} tokens; need at least 2")
    num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length, extra)
    separate = False
    samples_sans_final = 0
    if num_epochs > 1:
        samples_sans_final = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_length
        from_final = num_samples - samples_sans_final
        per_epoch = (tokens_per_epoch - extra) // seq_length
        separate = from_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(indices, num_epochs, rng, separate)
    sample_index = build_sample_index(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                                      drop_last_partial, extra)
    n = sample_index.shape[0] - 1
    shuffle_index = build_shuffle_index(samples_sans_final if separate else n, n, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


# ---------------------------------------------------------------- the dataset

def segment_ids_from_eod(tokens: np.ndarray, eod_id: Optional[int]) -> np.ndarray:
    """int32: how many EOD tokens come strictly before each position (Megatron's reset points)."""
    if eod_id is None:
        return np.zeros(len(tokens), np.int32)
    is_eod = tokens == eod_id
    seg = np.cumsum(is_eod, dtype=np.int32)
    seg -= is_eod
    return seg


class GPTDataset:
    """Samples of ``seq_length + 1`` tokens over one split of one indexed dataset.

    ``ds[i]`` -> ``{"tokens": int64[seq_length+1], "segment_ids": int32[seq_length+1]}``;
    ``segment_ids[t]`` counts EOD tokens before ``t`` (so documents separated by
    EOD get distinct ids, exactly Megatron's reset semantics) and is -1 on
    padding (only the last sample of a non-dropped partial split is padded).
    Inputs are ``tokens[:-1]``, labels ``tokens[1:]``.

    ``index_split`` is the split's ``(begin, end)`` range of sequence ids (a
    2-tuple/list or a ``range``), or an int array of explicit sequence ids.
    """

    def __init__(
        self,
        prefix_or_indexed: Union[str, IndexedDataset],
        split_name: str,
        index_split: Union[tuple[int, int], range, np.ndarray],
        num_samples: Optional[int],
        seq_length: int,
        seed: int,
        cache_dir: Optional[str],
        eod_id: Optional[int],
        pad_id: Optional[int] = None,
        drop_last_partial: bool = True,
        add_extra_token: int = 1,
        tokenizer_name: Optional[str] = None,
        return_segment_ids: bool = True,
    ) -> None:
        self.indexed = (prefix_or_indexed if isinstance(prefix_or_indexed, IndexedDataset)
                        else IndexedDataset(prefix_or_indexed))
        if seq_length < 2:
            raise DataError(f"seq_length must be at least 2, got {seq_length}")
        self.split_name = split_name
        if isinstance(index_split, range) and index_split.step == 1:
            index_split = (index_split.start, index_split.stop)
        if isinstance(index_split, (tuple, list)) and len(index_split) == 2:  # [begin, end) of sequences
            lo, hi = int(index_split[0]), int(index_split[1])
            if not 0 <= lo <= hi <= len(self.indexed):
                raise DataError(f"index_split {index_split} outside [0, {len(self.indexed)}] for {self.indexed.path_prefix}")
            self.indices = np.arange(lo, hi, dtype=np.int32)
            split_desc: object = [lo, hi]
        else:
            self.indices = np.asarray(index_split, dtype=np.int32)
            split_desc = {"n": int(len(self.indices)), "first": int(self.indices[0]) if len(self.indices) else None,
                          "last": int(self.indices[-1]) if len(self.indices) else None}
        self.seq_length = int(seq_length)
        self.extra = int(add_extra_token)
        self.eod_id = eod_id
        self.pad_id = pad_id if pad_id is not None else (eod_id if eod_id is not None else 0)
        self.return_segment_ids = return_segment_ids
        idx = self.indexed
        description = {
            "class": "GPTDataset",
            "dataset_path": os.path.abspath(idx.path_prefix),
            "dataset_fingerprint": [len(idx), idx.num_documents, idx.num_tokens, str(idx.dtype), idx.fingerprint()],
            "num_samples": num_samples,
            "index_split": split_name,
            "indices": split_desc,
            "random_seed": int(seed),
            "sequence_length": self.seq_length,
            "add_extra_token": self.extra,
            "drop_last_partial": bool(drop_last_partial),
            "tokenizer": tokenizer_name,
        }
        self.cache_key = description_hash(description)[1]
        t0 = time.time()
        arrays = cached_arrays(
            cache_dir, f"GPTDataset-{split_name}", description,
            lambda: build_gpt_indices(idx.sequence_lengths, self.indices, num_samples, self.seq_length,
                                      int(seed), drop_last_partial, self.extra),
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        log.info("GPTDataset %s/%s: %d samples (%.2fs)", os.path.basename(idx.path_prefix), split_name,
                 len(self), time.time() - t0)
        self._bind()

    def _bind(self) -> None:
        """Plain views of the mapped files for the hot path."""
        idx = self.indexed
        self._tokens = idx.tokens
        self._ptr = idx.sequence_pointers
        self._len = idx.sequence_lengths
        self._item = idx.dtype.itemsize

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("_tokens", "_ptr", "_len"):
            state.pop(k, None)
        for k in ("document_index", "sample_index", "shuffle_index"):
            a = state[k]
            if isinstance(a, np.memmap) and a.filename:  # cached: reopen by path, don't copy
                state[k] = ("__npy__", a.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            if isinstance(v, tuple) and len(v) == 2 and v[0] == "__npy__":
                state[k] = np.load(v[1], mmap_mode="r", allow_pickle=False)
        self.__dict__.update(state)
        self._bind()

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def _sample(self, idx: int) -> tuple[np.ndarray, int]:
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sample {idx} out of range ({n} samples)")
        j = int(self.shuffle_index[idx])
        b, b_off = self.sample_index[j]
        e, e_off = self.sample_index[j + 1]
        b, b_off, e, e_off = int(b), int(b_off), int(e), int(e_off)
        want = self.seq_length + self.extra
        out = np.empty(want, dtype=np.int64)
        toks, ptr, lens, item, doc_index = self._tokens, self._ptr, self._len, self._item, self.document_index
        if b == e:
            s = int(ptr[doc_index[b]]) // item + b_off
            k = e_off - b_off + self.extra
            out[:k] = toks[s:s + k]
        else:
            k = 0
            for p in range(b, e + 1):
                d = int(doc_index[p])
                s = int(ptr[d]) // item
                if p == b:
                    s += b_off
                    m = int(lens[d]) - b_off
                elif p == e:
                    m = e_off + self.extra
                else:
                    m = int(lens[d])
                out[k:k + m] = toks[s:s + m]
                k += m
        if k < want:
            out[k:] = self.pad_id
        return out, k

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        tokens, n = self._sample(int(idx))
        if not self.return_segment_ids:
            return {"tokens": tokens}
        seg = segment_ids_from_eod(tokens, self.eod_id)
        if n < len(tokens):
            seg[n:] = -1
        return {"tokens": tokens, "segment_ids": seg}
