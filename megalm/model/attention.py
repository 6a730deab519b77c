"""Self-attention over tensor-parallel heads, through torch's scaled_dot_product_attention.

The masks and position terms come in an ``AttnContext`` (``megalm.model.context``), built once per
forward and shared by every layer; ``recompute_core`` (set by ``megalm.model.recompute``) recomputes
the attention core in backward instead of storing it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.model.causal_attention import causal_attention
from megalm.model.context import AttnContext
from megalm.model.documents import documents_attention
from megalm.model.positions import apply_rope
from megalm.model.two_stream import two_stream_attention
from megalm.parallel import state
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalm.parallel.random import checkpoint, get_tracker


class KVCache:
    """One layer's keys and values of the positions decoded so far (generation)."""

    def __init__(self, kv: Optional[tuple] = None) -> None:
        self.kv = kv

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple:
        if self.kv is not None:
            k, v = torch.cat([self.kv[0], k], dim=2), torch.cat([self.kv[1], v], dim=2)
        self.kv = (k, v)
        return k, v


class Attention(nn.Module):
    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        tp = state.tensor_size()
        self.head_dim = m.hidden_size // m.num_heads
        self.heads, self.kv_heads = m.num_heads // tp, m.kv_heads // tp
        self.dropout = m.attention_dropout
        self.recompute_core = False
        q, kv = m.num_heads * self.head_dim, m.kv_heads * self.head_dim
        self.qkv = ColumnParallelLinear(m.hidden_size, q + 2 * kv, bias=m.bias, partitions=(q, kv, kv))
        self.out = RowParallelLinear(q, m.hidden_size, bias=m.bias)

    def project(self, x: torch.Tensor, ctx: AttnContext) -> tuple:
        """q, k, v as [b, heads, s, d], RoPE applied."""
        d = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        return (self._heads(q, self.heads, ctx), self._heads(k, self.kv_heads, ctx),
                self._heads(v, self.kv_heads, ctx, rotate=False))

    def project_query(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """q alone as [b, heads, s, d], RoPE applied: PLM's query stream takes k and v from the content stream."""
        return self._heads(self.qkv(x, rows=self.heads * self.head_dim), self.heads, ctx)

    def _heads(self, t: torch.Tensor, heads: int, ctx: AttnContext, rotate: bool = True) -> torch.Tensor:
        """[b, s, heads*d] -> [b, heads, s, d], RoPE applied when ``rotate`` and the context has it."""
        b, s, _ = t.shape
        t = t.view(b, s, heads, self.head_dim).transpose(1, 2)
        if rotate and ctx.rope is not None:
            t = apply_rope(t, *ctx.rope)
        return t

    def _local_heads(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None or t.size(1) == 1:
            return t
        r = state.tensor_rank()
        return t[:, r * self.heads:(r + 1) * self.heads]

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Attention on this rank's heads -> [b, s, heads*d]."""
        if ctx.order is not None:  # PLM's content stream alone (no query stream asked for), by factorisation order
            return self.core_two_stream(q, None, k, v, ctx)[0]
        if self.recompute_core and self.training:
            return checkpoint(self._core, q, k, v, ctx)
        return self._core(q, k, v, ctx)

    def core_two_stream(self, qh: torch.Tensor, qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        ctx: AttnContext) -> tuple:
        """PLM's content and query streams on this rank's heads by factorisation order (``ctx.order``) -> two
        [b, s, heads*d]; one gather of k and v serves both."""
        if self.recompute_core and self.training:
            return checkpoint(self._core_two_stream, qh, qg, k, v, ctx)
        return self._core_two_stream(qh, qg, k, v, ctx)

    def _core_two_stream(self, qh, qg, k, v, ctx: AttnContext) -> tuple:
        p = self.dropout if self.training else 0.0
        with get_tracker().fork():  # heads differ per TP rank, so must their dropout
            return two_stream_attention(qh, qg, k, v, ctx.order, p, self.kv_heads != self.heads)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        mask, row_ok = self._local_heads(ctx.mask), self._local_heads(ctx.row_ok)
        if mask is None:
            mask = ctx.key_padding
        if ctx.bias is not None:  # already this rank's heads; masked keys get -inf
            mask = ctx.bias if mask is None else ctx.bias.masked_fill(~mask, float("-inf"))
        p = self.dropout if self.training else 0.0
        gqa = self.kv_heads != self.heads
        with get_tracker().fork():  # heads differ per TP rank, so must their dropout
            if ctx.documents is not None:
                o = documents_attention(q, k, v, ctx.documents, p, gqa)
            elif ctx.causal and mask is None:
                o = causal_attention(q, k, v, p, gqa)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                   is_causal=ctx.causal and mask is None, enable_gqa=gqa)
        if row_ok is not None:
            o = o * row_ok.to(o.dtype)
        b, h, s, d = o.shape
        return o.transpose(1, 2).reshape(b, s, h * d)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: Optional[KVCache] = None) -> torch.Tensor:
        q, k, v = self.project(x, ctx)
        if cache is not None:
            k, v = cache.extend(k, v)
        return self.out(self.core(q, k, v, ctx))
