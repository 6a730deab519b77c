"""One Transformer layer (pre-LN or post-LN), with an optional second "query" stream (XLNet two-stream).

The query stream g shares every weight with the content stream h: its queries
come from g, keys/values from h, under its own mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.model.attention import Attention, AttnContext
from megalm.model.mlp import MLP
from megalm.model.norms import make_norm
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
    def __init__(self, m: ModelConfig, layer: int, seed: int, sequence_parallel: bool = False,
                 recompute_core: bool = False) -> None:
        super().__init__()
        self.post = m.norm_position == "post"
        self.p, self.sp = m.hidden_dropout, sequence_parallel
        self.attn_norm = make_norm(m, sequence_parallel)
        self.attention = Attention(m, layer, seed, sequence_parallel, recompute_core)
        self.mlp_norm = make_norm(m, sequence_parallel)
        self.mlp = MLP(m, layer, seed, sequence_parallel)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.sp)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:
            return self.mlp_norm(x + self._drop(self.mlp(x)))
        return x + self._drop(self.mlp(self.mlp_norm(x)))

    def forward(self, h: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return self.step(h, ctx)

    def step(self, h: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if self.post:
            h = self.attn_norm(h + self._drop(self.attention(h, ctx)))
        else:
            h = h + self._drop(self.attention(self.attn_norm(h), ctx))
        return self._ffn(h)

    def forward_two_stream(self, h: torch.Tensor, g: torch.Tensor, ctx: AttnContext,
                           query_ctx: AttnContext) -> tuple:
        att = self.attention
        hn = h if self.post else self.attn_norm(h)
        gn = g if self.post else self.attn_norm(g)
        qh, k, v = att.project(hn, ctx)
        qg, _, _ = att.project(gn, query_ctx)
        ah = att.out(att.core(qh, k, v, ctx))
        ag = att.out(att.core(qg, k, v, query_ctx))
        if self.post:
            h, g = self.attn_norm(h + self._drop(ah)), self.attn_norm(g + self._drop(ag))
        else:
            h, g = h + self._drop(ah), g + self._drop(ag)
        return self._ffn(h), self._ffn(g)


def run_block(block: Block, h: torch.Tensor, ctx: AttnContext, full_recompute: bool,
              g: Optional[torch.Tensor] = None, query_ctx: Optional[AttnContext] = None):
    """One block, optionally under RNG-correct full recomputation."""
    if g is None:
        return checkpoint(block.step, h, ctx) if full_recompute and block.training else block.step(h, ctx)
    if full_recompute and block.training:
        return checkpoint(block.forward_two_stream, h, g, ctx, query_ctx)
    return block.forward_two_stream(h, g, ctx, query_ctx)
