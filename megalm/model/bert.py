"""The BERT encoder: bidirectional blocks, token types, pooler, MLM head (tied decoder + bias), binary head.

Returns (this rank's MLM logits shard [b, s, V/tp], binary logits [b, 2] or
None when objective.binary_head is "none").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import Config, ModelConfig
from megalm.model.attention import attention_context
from megalm.model.block import Block, run_block
from megalm.model.embedding import Embedding, vocab_logits
from megalm.model.gpt import default_position_ids
from megalm.model.norms import make_norm
from megalm.model.positions import rope_cos_sin
from megalm.parallel.layers import full_normal, param_seed
from megalm.parallel.mappings import gather_sequence_no_reduce


def _linear(m: ModelConfig, din: int, dout: int, seed: int, name: str) -> nn.Linear:
    lin = nn.Linear(din, dout)
    lin.weight.data.copy_(full_normal((dout, din), m.init_std, param_seed(seed, name + ".weight")))
    lin.bias.data.zero_()
    return lin


class BertHead(nn.Module):
    """Pooler + MLM transform + binary head: the parameters after the last block."""

    def __init__(self, cfg: Config, sequence_parallel: bool) -> None:
        super().__init__()
        m, seed = cfg.model, cfg.train.seed
        self.sp = sequence_parallel
        self.final_norm = make_norm(m, sequence_parallel) if m.norm_position == "pre" else None
        self.lm_dense = _linear(m, m.hidden_size, m.hidden_size, seed, "lm_head.dense")
        self.lm_norm = make_norm(m)
        self.binary = cfg.objective.binary_head != "none"
        if self.binary:
            self.pooler = _linear(m, m.hidden_size, m.hidden_size, seed, "pooler.dense")
            self.binary_head = _linear(m, m.hidden_size, 2, seed, "binary_head")

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


class BertModel(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, padded_vocab: int) -> None:
        super().__init__()
        m, seed = cfg.model, cfg.train.seed
        self.cfg, self.vocab_size, self.padded_vocab = cfg, vocab_size, padded_vocab
        self.sp = cfg.parallel.sequence_parallel and cfg.parallel.tensor > 1
        ckpt = cfg.train.activation_checkpointing
        self.full_recompute = ckpt == "full"
        self.embedding = Embedding(m, vocab_size, padded_vocab, seed, self.sp, output_bias=True)
        self.layers = nn.ModuleList(Block(m, i, seed, self.sp, ckpt == "selective") for i in range(m.num_layers))
        self.head = BertHead(cfg, self.sp)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> tuple:
        m = self.cfg.model
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        b, s = input_ids.shape
        dtype = self.embedding.word.weight.dtype
        rope = rope_cos_sin(position_ids, m.hidden_size // m.num_heads, m.rope_base, dtype, m.rope_scaling) \
            if m.position == "rope" else None
        ctx = attention_context(b, s, False, input_ids.device, rope, padding_mask=padding_mask,
                                attention_mask=attention_mask)
        h = self.embedding(input_ids, position_ids, token_type_ids)
        for layer in self.layers:
            h = run_block(layer, h, ctx, self.full_recompute)
        x, binary = self.head(h)
        emb = self.embedding
        return vocab_logits(x, emb.word.weight, self.vocab_size, False, emb.lm_bias), binary
