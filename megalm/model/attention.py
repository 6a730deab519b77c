"""Self-attention over tensor-parallel heads, through torch's scaled_dot_product_attention.

Mask semantics (``AttnContext``, built once per batch by ``attention_context``
and shared by every layer): plain causal runs SDPA's ``is_causal``; packed
documents (``segment_ids``) run without any [s, s] mask (``megalm.model.documents``:
FlexAttention block masks on CUDA, one causal SDPA per document elsewhere);
key padding is a broadcast [b, 1, 1, s] mask; anything else is a dense boolean
``mask`` [b, 1|h, s, s], True = "query i may attend to key j". A query row with
no allowed key outputs zeros (SDPA would give NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.model.documents import Documents, documents_attention, packed_documents
from megalm.model.positions import apply_rope
from megalm.parallel import state
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear, param_seed
from megalm.parallel.random import checkpoint, get_tracker


@dataclass(frozen=True)
class AttnContext:
    """What every block needs besides the hidden states; built once per forward."""

    causal: bool
    mask: Optional[torch.Tensor] = None  # bool [b, 1|h, s, s], True = may attend
    row_ok: Optional[torch.Tensor] = None  # [b, 1|h, s, 1]: rows with at least one allowed key
    rope: Optional[tuple] = None  # (cos, sin) [b, 1, s, d]
    documents: Optional[Documents] = None  # causal attention within packed documents, no [s, s] mask
    key_padding: Optional[torch.Tensor] = None  # bool [b, 1, 1, s], True = a real key (every row has one)


def build_mask(batch: int, seq: int, causal: bool, device: torch.device,
               segment_ids: Optional[torch.Tensor] = None, padding_mask: Optional[torch.Tensor] = None,
               attention_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """AND of causal, same-segment, key padding and an arbitrary mask; None if only causal (or nothing)."""
    if segment_ids is None and padding_mask is None and attention_mask is None:
        return None
    mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device=device)
    if causal:
        mask = mask & torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, None, :]
    if attention_mask is not None:
        if attention_mask.dim() != 4:
            raise ValueError(f"attention_mask must be [b, 1|h, s, s], got shape {tuple(attention_mask.shape)}")
        mask = mask & attention_mask.bool()
    return mask


def make_context(mask: Optional[torch.Tensor], causal: bool, rope: Optional[tuple]) -> AttnContext:
    if mask is None:
        return AttnContext(causal=causal, rope=rope)
    row_ok = mask.any(dim=-1, keepdim=True)
    if bool(row_ok.all()):
        return AttnContext(causal=False, mask=mask, rope=rope)
    return AttnContext(causal=False, mask=mask | ~row_ok, row_ok=row_ok, rope=rope)


def attention_context(batch: int, seq: int, causal: bool, device: torch.device, rope: Optional[tuple] = None,
                      segment_ids: Optional[torch.Tensor] = None, padding_mask: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None) -> AttnContext:
    """The one context every layer shares, on the cheapest exact path for what is given.

    Same semantics as ``make_context(build_mask(...))`` (the dense reference the tests compare with),
    but only an arbitrary ``attention_mask`` (or segment ids that are not runs of documents) builds
    an [s, s] mask.
    """
    if attention_mask is None and padding_mask is None and segment_ids is not None and causal:
        docs = packed_documents(segment_ids)
        if docs is not None:
            return AttnContext(causal=False, rope=rope, documents=docs)
    if attention_mask is None and segment_ids is None and padding_mask is not None and not causal:
        keys = padding_mask.bool()
        if bool(keys.any(dim=-1).all()):
            return AttnContext(causal=False, rope=rope, key_padding=keys[:, None, None, :])
    mask = build_mask(batch, seq, causal, device, segment_ids=segment_ids, padding_mask=padding_mask,
                      attention_mask=attention_mask)
    return make_context(mask, causal, rope)


class Attention(nn.Module):
    def __init__(self, m: ModelConfig, layer: int, seed: int, sequence_parallel: bool = False,
                 recompute_core: bool = False) -> None:
        super().__init__()
        tp = state.tensor_size()
        self.head_dim = m.hidden_size // m.num_heads
        self.heads, self.kv_heads = m.num_heads // tp, m.kv_heads // tp
        self.dropout = m.attention_dropout
        self.recompute_core = recompute_core
        q, kv = m.num_heads * self.head_dim, m.kv_heads * self.head_dim
        name = f"layers.{layer}.attention"
        self.qkv = ColumnParallelLinear(m.hidden_size, q + 2 * kv, bias=m.bias, partitions=(q, kv, kv),
                                        init_std=m.init_std, seed=param_seed(seed, name + ".qkv.weight"),
                                        sequence_parallel=sequence_parallel)
        self.out = RowParallelLinear(q, m.hidden_size, bias=m.bias,
                                     init_std=m.init_std / (2.0 * m.num_layers) ** 0.5,
                                     seed=param_seed(seed, name + ".out.weight"), sequence_parallel=sequence_parallel)

    def project(self, x: torch.Tensor, ctx: AttnContext) -> tuple:
        """q, k, v as [b, heads, s, d], RoPE applied."""
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        d = self.head_dim
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(b, s, self.heads, d).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, d).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, d).transpose(1, 2)
        if ctx.rope is not None:
            cos, sin = ctx.rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _local_heads(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None or t.size(1) == 1:
            return t
        r = state.tensor_rank()
        return t[:, r * self.heads:(r + 1) * self.heads]

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Attention on this rank's heads -> [b, s, heads*d]."""
        if self.recompute_core and self.training:
            return checkpoint(self._core, q, k, v, ctx)
        return self._core(q, k, v, ctx)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        mask, row_ok = self._local_heads(ctx.mask), self._local_heads(ctx.row_ok)
        if mask is None:
            mask = ctx.key_padding
        p = self.dropout if self.training else 0.0
        gqa = self.kv_heads != self.heads
        with get_tracker().fork():  # heads differ per TP rank, so must their dropout
            if ctx.documents is not None:
                o = documents_attention(q, k, v, ctx.documents, p, gqa)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                   is_causal=ctx.causal and mask is None, enable_gqa=gqa)
        if row_ok is not None:
            o = o * row_ok.to(o.dtype)
        b, h, s, d = o.shape
        return o.transpose(1, 2).reshape(b, s, h * d)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        q, k, v = self.project(x, ctx)
        return self.out(self.core(q, k, v, ctx))
