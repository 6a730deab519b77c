"""What every attention layer needs besides the hidden states (masks, position terms), built once per forward.

``contexts`` is the one builder: GPT, BERT, each pipeline block and generation call it. Mask semantics:
plain causal runs SDPA's ``is_causal``; packed documents (``segment_ids``) run without any [s, s] mask
(``megalm.model.documents``); key padding is a broadcast [b, 1, 1, s] mask; anything else is a dense
boolean ``mask`` [b, 1|h, s, s], True = "query i may attend to key j". A query row with no allowed key
outputs zeros (SDPA would give NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from megalm.config import ModelConfig
from megalm.model.documents import Documents, packed_documents
from megalm.model.positions import alibi_bias, alibi_slopes, rope_cos_sin
from megalm.model.two_stream import FactorisationOrder, dense_masks, factorisation_order, use_order
from megalm.parallel import state


@dataclass(frozen=True)
class AttnContext:
    """What every block needs besides the hidden states; built once per forward."""

    causal: bool
    mask: Optional[torch.Tensor] = None  # bool [b, 1|h, s, s], True = may attend
    row_ok: Optional[torch.Tensor] = None  # [b, 1|h, s, 1]: rows with at least one allowed key
    rope: Optional[tuple] = None  # (cos, sin) [b, 1, s, d]
    documents: Optional[Documents] = None  # causal attention within packed documents, no [s, s] mask
    key_padding: Optional[torch.Tensor] = None  # bool [b, 1, 1, s], True = a real key (every row has one)
    bias: Optional[torch.Tensor] = None  # float [b, local heads, s, s] added to the scores (ALiBi)
    order: Optional[FactorisationOrder] = None  # PLM's two streams by factorisation order, no [s, s] mask


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


def _with_bias(ctx: AttnContext, bias: Optional[torch.Tensor], seq: int, past: int) -> AttnContext:
    """Add a score bias; a causal context becomes an explicit mask (SDPA takes a mask or is_causal, not both)."""
    if bias is None:
        return ctx
    mask = ctx.mask
    if mask is None and ctx.causal:
        mask = torch.ones(seq, past + seq, dtype=torch.bool, device=bias.device).tril(past)[None, None]
    return AttnContext(causal=False, mask=mask, row_ok=ctx.row_ok, rope=ctx.rope, bias=bias)


def _position_bias(m: ModelConfig, pos: torch.Tensor, past: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """ALiBi's bias on this TP rank's heads (heads are split over TP ranks in order), or None."""
    if m.position != "alibi":
        return None
    keys = torch.arange(past + pos.size(1), device=pos.device).expand(pos.size(0), -1) if past else pos
    slopes = alibi_slopes(m.num_heads).chunk(state.tensor_size())[state.tensor_rank()]
    return alibi_bias(pos, keys, slopes, dtype)


def _decode_mask(n: int, past: int, device: torch.device) -> Optional[torch.Tensor]:
    """New query j (absolute position past + j) sees cached and new keys 0 .. past + j; None when all are seen."""
    if n == 1:
        return None
    keys = torch.arange(past + n, device=device)[None, :]
    return (keys <= (past + torch.arange(n, device=device))[:, None])[None, None]


CONTEXT_INPUTS = ("position_ids", "segment_ids", "padding_mask", "attention_mask", "content_mask", "query_mask",
                  "order_rank")
# Every named input a model (and the first pipeline stage) takes: the embedding reads position and token-type
# ids, ``contexts`` the rest. A new optional input is a name here and its use in ``contexts`` (or the embedding).
MODEL_INPUTS = ("input_ids", "token_type_ids", *CONTEXT_INPUTS)


def check_inputs(names) -> None:
    unknown = sorted(set(names) - set(MODEL_INPUTS))
    if unknown:
        raise ValueError(f"unknown model input(s) {unknown}; the model takes {', '.join(MODEL_INPUTS)}")


def contexts(m: ModelConfig, batch: int, seq: int, device: torch.device, dtype: torch.dtype,
             inputs: Mapping[str, Optional[torch.Tensor]], past: int = 0) -> tuple:
    """(content-stream context, query-stream context or None) for ``seq`` new positions after ``past`` cached ones.

    ``inputs`` are the model's named inputs; those in CONTEXT_INPUTS shape attention, the rest are not read.
    GPT attends causally, BERT bidirectionally; the two-stream masks (PLM) say everything themselves, and so
    do PLM's order ranks (``order_rank`` [b, s]: the same masks, run by factorisation order without them).
    """
    pos, seg, pad, mask, content, query, rank = (inputs.get(k) for k in CONTEXT_INPUTS)
    if pos is None:
        pos = torch.arange(past, past + seq, device=device).unsqueeze(0).expand(batch, seq)
    rope = (rope_cos_sin(pos, m.hidden_size // m.num_heads, m.rope_base, dtype, m.rope_scaling)
            if m.position == "rope" else None)
    bias = _position_bias(m, pos, past, dtype)
    if rank is not None:
        if content is not None or query is not None:
            raise ValueError("give PLM's order_rank or its content_mask and query_mask, not both")
        if bias is None and not past and use_order(m.two_stream_attention, seq, device):
            order = factorisation_order(rank)
            return AttnContext(causal=False, rope=rope, order=order), AttnContext(causal=False, rope=rope, order=order)
        content, query = dense_masks(rank)  # measured faster here, or a dense score bias (ALiBi) anyway
    if content is not None or query is not None:
        return tuple(_with_bias(make_context(build_mask(batch, seq, False, device, attention_mask=x), False, rope),
                                bias, seq, past) for x in (content, query))
    causal = m.arch == "gpt"
    if past:
        ctx = make_context(_decode_mask(seq, past, device), False, rope)
    elif bias is not None:  # a dense bias anyway: the document / key-padding fast paths have nothing to save
        ctx = make_context(build_mask(batch, seq, causal, device, seg, pad, mask), causal, rope)
    else:
        ctx = attention_context(batch, seq, causal, device, rope, segment_ids=seg, padding_mask=pad,
                                attention_mask=mask)
    return _with_bias(ctx, bias, seq, past), None
