"""The BERT encoder: bidirectional blocks, token types, pooler, MLM head (tied decoder + bias), binary head.

Returns (this rank's MLM logits shard [b, s, V/tp], binary logits [b, 2] or
None when built without the binary (SOP/NSP) head).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.model.block import Block
from megalm.model.context import check_inputs, contexts
from megalm.model.embedding import Embedding, vocab_logits
from megalm.model.gpt import final_norm, run_blocks
from megalm.model.norms import make_norm
from megalm.parallel import state
from megalm.parallel.mappings import gather_sequence_no_reduce


class BertHead(nn.Module):
    """Pooler + MLM transform + binary head: the parameters after the last block."""

    def __init__(self, m: ModelConfig, binary_head: bool) -> None:
        super().__init__()
        self.sp = state.sequence_parallel()
        self.final_norm = final_norm(m)
        self.lm_dense = nn.Linear(m.hidden_size, m.hidden_size)
        self.lm_norm = make_norm(m, sequence_parallel=False)  # runs on the gathered sequence
        self.binary = binary_head
        if binary_head:
            self.pooler = nn.Linear(m.hidden_size, m.hidden_size)
            self.binary_head = nn.Linear(m.hidden_size, 2)

    def forward(self, h: torch.Tensor) -> tuple:
        """(MLM-transformed hidden states over the full sequence, binary logits or None)."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        # the transform is replicated: run it on the full sequence so its params need no SP treatment
        full = gather_sequence_no_reduce(h) if self.sp else h
        x = self.lm_norm(F.gelu(self.lm_dense(full)))
        binary = None
        if self.binary:
            binary = self.binary_head(torch.tanh(self.pooler(full[:, 0])))
        return x, binary


def bert_logits(emb: Embedding, x: torch.Tensor) -> torch.Tensor:
    """The MLM decoder: the tied word table plus its bias, on the full sequence."""
    return vocab_logits(x, emb.word.weight, emb.vocab_size, False, emb.lm_bias)


class BertModel(nn.Module):
    def __init__(self, m: ModelConfig, vocab_size: int, padded_vocab: int, binary_head: bool = True) -> None:
        super().__init__()
        self.m, self.vocab_size, self.padded_vocab = m, vocab_size, padded_vocab
        self.embedding = Embedding(m, vocab_size, padded_vocab, output_bias=True)
        self.layers = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        self.head = BertHead(m, binary_head)

    def forward(self, input_ids: torch.Tensor, **inputs: Optional[torch.Tensor]) -> tuple:
        """(MLM logits, binary logits or None) given named ``inputs`` (``megalm.model.context.MODEL_INPUTS``:
        token_type_ids, padding_mask, attention_mask, position_ids)."""
        check_inputs(inputs)
        b, s = input_ids.shape
        ctx, _ = contexts(self.m, b, s, input_ids.device, self.embedding.word.weight.dtype, inputs)
        h = run_blocks(self.layers, self.embedding(input_ids, inputs.get("position_ids"), inputs.get("token_type_ids")),
                       ctx)
        x, binary = self.head(h)
        return bert_logits(self.embedding, x), binary
