"""From a GPT sample's ``segment_ids`` to what CLM needs, vectorised, without a dense [S, S] mask.

Helpers for the CLM objective (it may also do the same in torch on the
batch): position ids that restart after each EOD, the EOD loss mask, and
``cu_seqlens`` for variable-length (per-document) attention.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def position_ids(segment_ids: np.ndarray) -> np.ndarray:
    """int64 positions restarting at 0 where the segment id changes; works on [..., S]."""
    seg = np.asarray(segment_ids)
    n = seg.shape[-1]
    idx = np.broadcast_to(np.arange(n, dtype=np.int64), seg.shape)
    start = np.zeros(seg.shape, dtype=np.int64)
    start[..., 1:] = np.where(seg[..., 1:] != seg[..., :-1], idx[..., 1:], 0)
    np.maximum.accumulate(start, axis=-1, out=start)
    return idx - start


def loss_mask(inputs: np.ndarray, label_segment_ids: np.ndarray, eod_id: Optional[int],
              eod_mask_loss: bool) -> np.ndarray:
    """float32 mask over positions: 0 on padded labels, and where the input is EOD if ``eod_mask_loss``."""
    mask = (np.asarray(label_segment_ids) >= 0).astype(np.float32)
    if eod_mask_loss and eod_id is not None:
        mask[np.asarray(inputs) == eod_id] = 0.0
    return mask


def cu_seqlens(segment_ids: np.ndarray) -> np.ndarray:
    """int32 [0, start of each later segment, S] for one sample's [S] segment ids (flash-attn varlen)."""
    seg = np.asarray(segment_ids)
    starts = np.flatnonzero(seg[1:] != seg[:-1]) + 1
    out = np.empty(len(starts) + 2, dtype=np.int32)
    out[0] = 0
    out[1:-1] = starts
    out[-1] = len(seg)
    return out


def attention_allowed(segment_ids: np.ndarray) -> np.ndarray:
    """bool [..., S, S]: causal and same segment. Dense: for tests and small S only."""
    seg = np.asarray(segment_ids)
    n = seg.shape[-1]
    causal = np.tril(np.ones((n, n), dtype=bool))
    return causal & (seg[..., :, None] == seg[..., None, :])
