"""Causal attention inside packed documents (CLM's ``reset_attention_mask``) without an [s, s] mask.

``packed_documents`` turns a batch's segment ids into a layout built once per
batch and shared by every layer: FlexAttention block indices (O((s/128)^2)
small ints, fully masked blocks skipped) for CUDA, and each document's span
for one causal attention call per distinct span, batched over the rows that
share it, elsewhere (exact; torch's FlexAttention has no CPU backward) and
under attention dropout (FlexAttention has none).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from megalm.model.causal_attention import causal_attention

BLOCK = 128  # FlexAttention's default block size


@dataclass(frozen=True)
class Documents:
    segment_ids: torch.Tensor  # int [b, s], non-decreasing along s (documents are runs)
    block_mask: Optional[object] = None  # torch.nn.attention.flex_attention.BlockMask, or None

    @functools.cached_property
    def spans(self) -> tuple:
        """Per sample: ((start, end), ...) of its documents; computed on first use (a host sync on CUDA)."""
        return document_spans(self.segment_ids)


def document_spans(segment_ids: torch.Tensor) -> tuple:
    """((start, end), ...) per row of [b, s] segment ids: the runs of equal ids."""
    b, s = segment_ids.shape
    rows, cols = torch.nonzero(segment_ids[:, 1:] != segment_ids[:, :-1], as_tuple=True)
    starts: list = [[0] for _ in range(b)]
    for r, c in zip(rows.tolist(), cols.tolist()):
        starts[r].append(c + 1)
    return tuple(tuple(zip(st, st[1:] + [s])) for st in starts)


def document_block_mask(segment_ids: torch.Tensor, block: int = BLOCK):
    """A FlexAttention BlockMask for "causal and same document", from block-level first/last segment ids.

    Needs non-decreasing ids and s divisible by ``block``. Never evaluates the
    mask over [s, s]: a block pair is empty, full or partial from the ids at
    the two blocks' ends, and only partial blocks run ``mask_mod`` per element.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, s = segment_ids.shape
    if s % block:
        raise ValueError(f"sequence length {s} is not a multiple of the block size {block}")
    n = s // block
    blocks = segment_ids.view(b, n, block)
    lo, hi = blocks[..., 0], blocks[..., -1]  # [b, n]: first and last id of each block
    qi = torch.arange(n, device=segment_ids.device)[:, None]
    kj = torch.arange(n, device=segment_ids.device)[None, :]
    some = (kj <= qi) & (hi[:, None, :] >= lo[:, :, None])  # [b, q block, kv block]
    full = (kj < qi) & (lo[:, None, :] == hi[:, :, None])
    partial = some & ~full

    def indices(m: torch.Tensor) -> tuple:
        num = m.sum(-1, dtype=torch.int32)[:, None]
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        return num, order

    seg = segment_ids

    def same_document(bi, hi_, q, kv):  # noqa: ARG001 - FlexAttention's mask_mod signature (b, h, q, kv)
        return (q >= kv) & (seg[bi, q] == seg[bi, kv])

    return BlockMask.from_kv_blocks(*indices(partial), *indices(full), BLOCK_SIZE=block, mask_mod=same_document,
                                    seq_lengths=(s, s))


def packed_documents(segment_ids: torch.Tensor, flex: Optional[bool] = None) -> Optional[Documents]:
    """The layout for [b, s] segment ids, or None when they are not runs (the caller uses a dense mask).

    ``flex`` (default: on CUDA when s is a multiple of 128) also builds the FlexAttention block mask.
    """
    seg = segment_ids
    if seg.dim() != 2 or not bool((seg[:, 1:] >= seg[:, :-1]).all()):
        return None
    if flex is None:
        flex = seg.is_cuda and seg.size(1) % BLOCK == 0
    return Documents(seg, document_block_mask(seg) if flex else None)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@torch.compiler.disable  # a Python loop over this batch's documents: keep it out of compiled blocks
def documents_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, dropout_p: float,
                        gqa: bool) -> torch.Tensor:
    """[b, h, s, d] attention where each query sees the keys at or before it in its own document."""
    if docs.block_mask is not None and dropout_p == 0.0:
        if q.is_cuda:
            return _compiled_flex()(q, k, v, block_mask=docs.block_mask, enable_gqa=gqa)
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=docs.block_mask, enable_gqa=gqa)  # CPU: forward only
    return _per_span(q, k, v, docs.spans, dropout_p, gqa)


def _per_span(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: tuple, dropout_p: float,
              gqa: bool) -> torch.Tensor:
    """One causal attention call per distinct (start, end) span, batched over the rows that hold it.

    Rows that are one whole document (the common case when documents are longer than samples) share
    the span (0, s) and so run as one batched call, as fast as plain causal attention.
    """
    rows_of: dict = {}
    for i, row in enumerate(spans):
        for span in row:
            rows_of.setdefault(span, []).append(i)
    out = {}
    for (a, e), rows in rows_of.items():
        if len(rows) == q.size(0):
            part = causal_attention(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], dropout_p, gqa)
        else:
            idx = torch.tensor(rows, device=q.device)
            part = causal_attention(q[idx, :, a:e], k[idx, :, a:e], v[idx, :, a:e], dropout_p, gqa)
        for j, i in enumerate(rows):
            out[i, a] = part[j:j + 1]
    pieces = [[out[i, a] for a, _ in row] for i, row in enumerate(spans)]
    return torch.cat([p[0] if len(p) == 1 else torch.cat(p, dim=2) for p in pieces], dim=0)
