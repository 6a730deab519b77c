"""PLM's two attention streams (XLNet) from each sample's factorisation order, without [s, s] masks.

``factorisation_order`` turns [b, s] order ranks into a layout built once per
forward and shared by every layer (O(b s) ints). ``two_stream_attention``
gathers q, k, v into each sample's order, where the content stream (keys at or
before the query in the order) is causal attention (``causal_attention``: SDPA
``is_causal``) and the query stream (strictly before) is the same of queries
1..s-1 against keys 0..s-2 (the first token in the order sees nothing: zeros,
as the dense masks give), then permutes both outputs back. ``dense_masks`` is
the [s, s] form, the general fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megalm.model.causal_attention import causal_attention


# Shortest sequence from which the order path was at parity or faster than the dense masks on this CPU
# (benchmarks/plm_streams.py, docs/model.md: 0.98x at s = 256, 0.89-1.03x at 128 and 384 depending on load, 0.995-1.05x
# at 512, 1.01x at 768, 1.12x at 1024, 1.31-1.35x at 2048); below it the gathers cost more than causal attention saves.
CPU_ORDER_MIN_SEQ = 512


def use_order(mode: str, seq: int, device: torch.device) -> bool:
    """``model.two_stream_attention``: "order" | "masks", or "auto": order except on CPU below CPU_ORDER_MIN_SEQ."""
    if mode != "auto":
        return mode == "order"
    return device.type != "cpu" or seq >= CPU_ORDER_MIN_SEQ


@dataclass(frozen=True)
class FactorisationOrder:
    order: torch.Tensor  # int64 [b, s]: original position of the t-th token of the order
    rank: torch.Tensor  # int64 [b, s]: each token's place in the order (the inverse of ``order``)
    rows: torch.Tensor  # int64 [b, 1]: sample index, for advanced indexing


def dense_masks(rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(content_mask, query_mask), bool [b, 1, s, s]; True where query i may attend to key j."""
    before_or_self = rank[:, None, :] <= rank[:, :, None]
    before = rank[:, None, :] < rank[:, :, None]
    return before_or_self.unsqueeze(1), before.unsqueeze(1)


def factorisation_order(rank: torch.Tensor) -> FactorisationOrder:
    """The layout for int [b, s] ranks, each row a permutation of 0..s-1 (checked: ties would change the masks)."""
    if rank.dim() != 2 or rank.dtype.is_floating_point or rank.dtype == torch.bool:
        raise ValueError(f"order_rank must be an integer [b, s] tensor, got {rank.dtype} of shape {tuple(rank.shape)}")
    rank = rank.long()
    b, s = rank.shape
    order = rank.argsort(dim=-1)
    if not bool((rank.gather(-1, order) == torch.arange(s, device=rank.device)).all()):
        raise ValueError("order_rank: every row must be a permutation of 0..s-1 (each token's place in its sample's "
                         "factorisation order, as megalm.objectives.plm.order_ranks draws it); for any other "
                         "pattern pass content_mask and query_mask instead")
    return FactorisationOrder(order, rank, torch.arange(b, device=rank.device)[:, None])


class _Permute(torch.autograd.Function):
    """x[b, index[b, t]] along dim 1 for a permutation ``index``; backward permutes back (no scatter-add)."""

    @staticmethod
    def forward(ctx, x, rows, index, inverse):
        ctx.save_for_backward(rows, inverse)
        return x[rows, index]

    @staticmethod
    def backward(ctx, grad):
        rows, inverse = ctx.saved_tensors
        return grad[rows, inverse], None, None, None


def _to_order(x: torch.Tensor, o: FactorisationOrder) -> torch.Tensor:
    """[b, h, s, d] in original positions -> the same in factorisation order (stored as [b, s, h, d])."""
    return _Permute.apply(x.transpose(1, 2), o.rows, o.order, o.rank).transpose(1, 2)


def _to_positions(x: torch.Tensor, o: FactorisationOrder) -> torch.Tensor:
    """[b, h, s, d] in factorisation order -> [b, s, h * d] in original positions (one copy, as a transpose needs)."""
    b, h, s, d = x.shape
    return _Permute.apply(x.transpose(1, 2), o.rows, o.rank, o.order).reshape(b, s, h * d)


def two_stream_attention(qh: torch.Tensor, qg: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                         o: FactorisationOrder, dropout_p: float, gqa: bool) -> tuple:
    """Content- and query-stream attention, [b, h, s, d] in -> two [b, s, h * d] out, in original positions.

    Content query i sees keys j with rank[j] <= rank[i], query-stream query i those with rank[j] < rank[i].
    k and v are gathered once for both streams: 4 gathers and 2 scatters of [b, h, s, d] per layer.
    Without ``qg`` only the content stream runs: (content, None).
    """
    qh, k, v = (_to_order(t, o) for t in (qh, k, v))
    content = causal_attention(qh, k, v, dropout_p, gqa)
    if qg is None:
        return _to_positions(content, o), None
    qg = _to_order(qg, o)
    # Strictly causal = causal after shifting the keys by one: query t (t >= 1) sees keys 0..t-1.
    query = causal_attention(qg[:, :, 1:], k[:, :, :-1], v[:, :, :-1], dropout_p, gqa)
    query = F.pad(query, (0, 0, 1, 0))  # the first token of the order has no key: zeros
    return _to_positions(content, o), _to_positions(query, o)
