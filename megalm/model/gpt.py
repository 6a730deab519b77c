"""The decoder-only GPT: embedding, blocks, final norm, vocab-parallel head (tied or not).

Returns this TP rank's logits shard; the loss is ``vocab_parallel_cross_entropy``.
Also carries the PLM (XLNet two-stream) path: ``two_stream=True`` returns the
query stream's logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megalm.config import Config
from megalm.model.attention import attention_context, build_mask, make_context
from megalm.model.block import Block, run_block
from megalm.model.embedding import Embedding, vocab_logits
from megalm.model.norms import make_norm
from megalm.model.positions import rope_cos_sin
from megalm.parallel.layers import ColumnParallelLinear, param_seed


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)


class GPTModel(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, padded_vocab: int) -> None:
        super().__init__()
        m, seed = cfg.model, cfg.train.seed
        self.cfg, self.vocab_size, self.padded_vocab = cfg, vocab_size, padded_vocab
        self.sp = cfg.parallel.sequence_parallel and cfg.parallel.tensor > 1
        ckpt = cfg.train.activation_checkpointing
        self.full_recompute = ckpt == "full"
        two_stream = cfg.objective.name == "plm"
        self.embedding = Embedding(m, vocab_size, padded_vocab, seed, self.sp, two_stream)
        self.layers = nn.ModuleList(Block(m, i, seed, self.sp, ckpt == "selective") for i in range(m.num_layers))
        self.final_norm = make_norm(m, self.sp) if m.norm_position == "pre" else None
        if m.tie_embeddings:
            self.head = None
        else:
            self.head = ColumnParallelLinear(m.hidden_size, padded_vocab, bias=False, init_std=m.init_std,
                                             seed=param_seed(seed, "head.weight"), sequence_parallel=self.sp)

    def contexts(self, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids=None, attention_mask=None,
                 content_mask=None, query_mask=None, dtype: torch.dtype = torch.float32) -> tuple:
        m = self.cfg.model
        b, s = input_ids.shape
        rope = rope_cos_sin(position_ids, m.hidden_size // m.num_heads, m.rope_base, dtype, m.rope_scaling) \
            if m.position == "rope" else None
        if content_mask is not None or query_mask is not None:  # PLM: the masks say everything
            ctx = make_context(build_mask(b, s, False, input_ids.device, attention_mask=content_mask), False, rope)
            qctx = make_context(build_mask(b, s, False, input_ids.device, attention_mask=query_mask), False, rope)
            return ctx, qctx
        return attention_context(b, s, True, input_ids.device, rope, segment_ids=segment_ids,
                                 attention_mask=attention_mask), None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            h = self.final_norm(h)
        weight = self.embedding.word.weight if self.head is None else self.head.weight
        return vocab_logits(h, weight, self.vocab_size, self.sp)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                content_mask: Optional[torch.Tensor] = None, query_mask: Optional[torch.Tensor] = None,
                two_stream: bool = False) -> torch.Tensor:
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        dtype = self.embedding.word.weight.dtype
        ctx, qctx = self.contexts(input_ids, position_ids, segment_ids, attention_mask, content_mask, query_mask,
                                  dtype)
        if not two_stream:
            h = self.embedding(input_ids, position_ids)
            for layer in self.layers:
                h = run_block(layer, h, ctx, self.full_recompute)
            return self.logits(h)
        if qctx is None:
            raise ValueError("two_stream=True needs content_mask and query_mask")
        h, g = self.embedding(input_ids, position_ids, two_stream=True)
        for layer in self.layers:
            h, g = run_block(layer, h, ctx, self.full_recompute, g, qctx)
        return self.logits(g)
