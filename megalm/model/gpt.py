"""The decoder-only GPT: embedding, blocks, final norm, vocab-parallel head (tied or not).

Returns this TP rank's logits shard; the loss is ``vocab_parallel_cross_entropy``.
Built with ``query_stream`` it also runs the PLM (XLNet two-stream) path: given
``order_rank`` (or ``content_mask`` and ``query_mask``) it returns the query stream's logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megalm.config import ModelConfig
from megalm.model.block import Block
from megalm.model.context import check_inputs, contexts
from megalm.model.embedding import Embedding, default_position_ids, vocab_logits  # noqa: F401  (re-export)
from megalm.model.norms import make_norm
from megalm.parallel import state
from megalm.parallel.layers import ColumnParallelLinear


def final_norm(m: ModelConfig) -> Optional[nn.Module]:
    """The norm after the last block (pre-LN models only)."""
    return make_norm(m) if m.norm_position == "pre" else None


def output_head(m: ModelConfig, padded_vocab: int) -> Optional[ColumnParallelLinear]:
    """GPT's own output layer; None when it shares the word embedding."""
    return None if m.tie_embeddings else ColumnParallelLinear(m.hidden_size, padded_vocab, bias=False)


def run_blocks(blocks, x, ctx, query_ctx=None):
    """h, or (h, g) with the query stream, through every block."""
    for block in blocks:
        x = block(x, ctx, query_ctx)
    return x


class GPTModel(nn.Module):
    def __init__(self, m: ModelConfig, vocab_size: int, padded_vocab: int, query_stream: bool = False) -> None:
        super().__init__()
        self.m, self.vocab_size, self.padded_vocab = m, vocab_size, padded_vocab
        self.sp = state.sequence_parallel()
        self.embedding = Embedding(m, vocab_size, padded_vocab, query_stream)
        self.layers = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        self.final_norm = final_norm(m)
        self.head = output_head(m, padded_vocab)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            h = self.final_norm(h)
        weight = self.embedding.word.weight if self.head is None else self.head.weight
        return vocab_logits(h, weight, self.vocab_size, self.sp)

    def forward(self, input_ids: torch.Tensor, two_stream: Optional[bool] = None,
                **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits for ``input_ids`` given named ``inputs`` (``megalm.model.context.MODEL_INPUTS``: position_ids,
        segment_ids, attention_mask; PLM's order_rank, or its content_mask and query_mask). ``two_stream``
        (default: whether order_rank or query_mask is given) returns the query stream's logits."""
        check_inputs(inputs)
        plm = inputs.get("order_rank") is not None or inputs.get("query_mask") is not None
        two_stream = plm if two_stream is None else two_stream
        if two_stream and not plm:
            raise ValueError("two_stream=True needs order_rank, or content_mask and query_mask")
        b, s = input_ids.shape
        ctx, qctx = contexts(self.m, b, s, input_ids.device, self.embedding.word.weight.dtype, inputs)
        h = self.embedding(input_ids, inputs.get("position_ids"), inputs.get("token_type_ids"), two_stream)
        x = run_blocks(self.layers, h, ctx, qctx)
        return self.logits(x[1] if two_stream else x)
