"""One Transformer layer (pre-LN or post-LN), with an optional second "query" stream (XLNet two-stream).

The query stream g shares every weight with the content stream h: its queries
come from g, keys/values from h, under its own mask. ``recompute`` ("none" |
"full", set from outside by ``megalm.model.recompute``) reruns the whole block
in backward, RNG-correct, instead of storing its activations.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.model.attention import Attention, KVCache
from megalm.model.context import AttnContext
from megalm.model.mlp import MLP
from megalm.model.norms import make_norm
from megalm.parallel import state
from megalm.parallel.random import checkpoint, get_tracker


def dropout(x: torch.Tensor, p: float, training: bool, split: bool) -> torch.Tensor:
    """Dropout from the replicated stream, or the per-TP-rank stream when ``x`` is split across ranks."""
    if not training or p == 0.0:
        return x
    if split:
        with get_tracker().fork():
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)


class Block(nn.Module):
    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.post = m.norm_position == "post"
        self.p, self.sp = m.hidden_dropout, state.sequence_parallel()
        self.recompute = "none"
        self.attn_norm = make_norm(m)
        self.attention = Attention(m)
        self.mlp_norm = make_norm(m)
        self.mlp = MLP(m)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.sp)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:
            return self.mlp_norm(x + self._drop(self.mlp(x)))
        return x + self._drop(self.mlp(self.mlp_norm(x)))

    def forward(self, x, ctx: AttnContext, query_ctx: Optional[AttnContext] = None,
                cache: Optional[KVCache] = None):
        """h -> h, or (h, g) -> (h, g) with the query stream; ``cache`` extends a KV cache (generation)."""
        full = self.recompute == "full" and self.training
        if torch.is_tensor(x):
            return checkpoint(self.step, x, ctx) if full else self.step(x, ctx, cache)
        h, g = x
        if full:
            return checkpoint(self.forward_two_stream, h, g, ctx, query_ctx)
        return self.forward_two_stream(h, g, ctx, query_ctx)

    def step(self, h: torch.Tensor, ctx: AttnContext, cache: Optional[KVCache] = None) -> torch.Tensor:
        if self.post:
            h = self.attn_norm(h + self._drop(self.attention(h, ctx, cache)))
        else:
            h = h + self._drop(self.attention(self.attn_norm(h), ctx, cache))
        return self._ffn(h)

    def forward_two_stream(self, h: torch.Tensor, g: torch.Tensor, ctx: AttnContext,
                           query_ctx: AttnContext) -> tuple:
        att = self.attention
        hn = h if self.post else self.attn_norm(h)
        gn = g if self.post else self.attn_norm(g)
        qh, k, v = att.project(hn, ctx)
        qg = att.project_query(gn, query_ctx)  # g's own keys and values would go unused
        if ctx.order is not None:  # PLM by factorisation order: no masks, k and v gathered once for both
            ah, ag = (att.out(o) for o in att.core_two_stream(qh, qg, k, v, ctx))
        else:
            ah = att.out(att.core(qh, k, v, ctx))
            ag = att.out(att.core(qg, k, v, query_ctx))
        if self.post:
            h, g = self.attn_norm(h + self._drop(ah)), self.attn_norm(g + self._drop(ag))
        else:
            h, g = h + self._drop(ah), g + self._drop(ag)
        return self._ffn(h), self._ffn(g)
