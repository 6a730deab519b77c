"""Input embeddings (vocab-parallel words, positions, token types) and the vocab-parallel output logits.

Padded vocabulary rows exist only so V divides by TP; their logits are set to
-inf so they never win a softmax and carry no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.model.block import dropout
from megalm.model.norms import make_norm
from megalm.model.positions import sinusoidal_table
from megalm.parallel import state
from megalm.parallel.layers import VocabParallelEmbedding, mark_tensor_parallel
from megalm.parallel.mappings import (
    copy_to_tensor_region,
    gather_from_sequence_region,
    scatter_to_sequence_region,
)


class Embedding(nn.Module):
    """Word (+ position, token-type) embeddings; ``query_stream`` adds XLNet's query-stream start vector,
    ``output_bias`` BERT's MLM decoder bias (it lives with the tied word table: one pipeline layer owns both)."""

    def __init__(self, m: ModelConfig, vocab_size: int, padded_vocab: int, query_stream: bool = False,
                 output_bias: bool = False) -> None:
        super().__init__()
        self.sp, self.p, self.position = state.sequence_parallel(), m.hidden_dropout, m.position
        self.vocab_size = vocab_size
        self.word = VocabParallelEmbedding(padded_vocab, m.hidden_size)
        if m.position == "learned":
            self.pos = nn.Embedding(m.max_positions, m.hidden_size)
        elif m.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(m.max_positions, m.hidden_size), persistent=False)
        if m.num_token_types:
            self.token_type = nn.Embedding(m.num_token_types, m.hidden_size)
        self.norm = make_norm(m) if m.norm_position == "post" else None
        if output_bias:
            self.lm_bias = nn.Parameter(torch.zeros(padded_vocab // state.tensor_size()))
            mark_tensor_parallel(self.lm_bias, 0, (padded_vocab,))
        else:
            self.lm_bias = None
        self.query = nn.Parameter(torch.empty(m.hidden_size)) if query_stream else None

    def _extra(self, position_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Position + token-type embeddings for the full sequence (replicated), or None."""
        out = None
        if self.position == "learned":
            out = self.pos(position_ids)
        elif self.position == "sinusoidal":
            out = self.sinusoid[position_ids]
        if token_type_ids is not None and hasattr(self, "token_type"):
            t = self.token_type(token_type_ids)
            out = t if out is None else out + t
        return out

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return dropout(x, self.p, self.training, self.sp)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, two_stream: bool = False):
        """h [b, s(/tp under SP), hidden], or (h, g) with the query stream g when ``two_stream``."""
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        h = self.word(input_ids)
        extra = self._extra(position_ids, token_type_ids)
        if extra is not None:
            h = h + (scatter_to_sequence_region(extra) if self.sp else extra)
        h = self._finish(h)
        if not two_stream:
            return h
        if self.query is None:
            raise ValueError("two_stream=True needs a model built with the PLM query stream (objective plm)")
        b, s = position_ids.shape
        q = self.query.view(1, 1, -1).expand(b, s, -1)
        if self.position in ("learned", "sinusoidal"):
            q = q + self._extra(position_ids, None)
        if self.sp:
            q = scatter_to_sequence_region(q)
        return h, self._finish(q)


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)


def vocab_logits(h: torch.Tensor, weight: torch.Tensor, vocab_size: int, sequence_parallel: bool,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's logits shard [b, s, V_padded/tp]; padded columns are -inf."""
    h = gather_from_sequence_region(h) if sequence_parallel else copy_to_tensor_region(h)
    logits = F.linear(h, weight, bias)
    v_local = weight.size(0)
    start = state.tensor_rank() * v_local
    if start + v_local > vocab_size:
        first_pad = max(vocab_size - start, 0)
        logits[..., first_pad:] = float("-inf")
    return logits
