"""The model as a flat list of DeepSpeed pipe layers: embedding, blocks, final norm, head.

Activations between layers are one tuple of tensors: ``(hidden, [query
stream g,] *aux)`` where aux are the data iterator's input tensors after the
first (``inputs`` names them, e.g. position_ids, segment_ids, masks). Masks and
RoPE tables are rebuilt in every block from aux, so only tensors travel.
Parameter names inside each layer equal build_model's under a prefix
(``pipeline_name_prefixes``), and weights come from the same seeds.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from megalm.config import Config
from megalm.errors import ConfigError
from megalm.model import padded_vocab_size
from megalm.model.attention import attention_context, build_mask, make_context
from megalm.model.bert import BertHead
from megalm.model.block import Block, run_block
from megalm.model.embedding import Embedding, vocab_logits
from megalm.model.gpt import default_position_ids
from megalm.model.norms import make_norm
from megalm.model.positions import rope_cos_sin
from megalm.parallel.layers import ColumnParallelLinear, param_seed

INPUT_NAMES = ("input_ids", "position_ids", "segment_ids", "attention_mask", "token_type_ids", "padding_mask",
               "content_mask", "query_mask")


def default_inputs(cfg: Config) -> tuple:
    """What the data iterator yields as the pipeline's input tuple, by objective."""
    if cfg.model.arch == "bert":
        return ("input_ids", "token_type_ids", "padding_mask")
    if cfg.objective.name == "plm":
        return ("input_ids", "position_ids", "content_mask", "query_mask")
    if cfg.objective.reset_attention_mask:
        return ("input_ids", "position_ids", "segment_ids")
    return ("input_ids", "position_ids")


def _sp(cfg: Config) -> bool:
    return cfg.parallel.sequence_parallel and cfg.parallel.tensor > 1


class _Layout:
    def __init__(self, cfg: Config, inputs: Sequence[str]) -> None:
        unknown = [n for n in inputs if n not in INPUT_NAMES]
        if unknown or not inputs or inputs[0] != "input_ids":
            raise ConfigError(f"pipeline inputs must start with input_ids and use only {INPUT_NAMES}; got {inputs}")
        self.cfg, self.inputs = cfg, tuple(inputs)
        self.two_stream = "query_mask" in inputs
        self.aux_names = self.inputs[1:]

    def aux(self, acts: tuple) -> dict:
        skip = 2 if self.two_stream else 1
        return dict(zip(self.aux_names, acts[skip:]))


class EmbeddingPipe(Embedding):
    def __init__(self, cfg: Config, vocab_size: int, inputs: Sequence[str]) -> None:
        self.layout = _Layout(cfg, inputs)
        super().__init__(cfg.model, vocab_size, padded_vocab_size(vocab_size, cfg), cfg.train.seed, _sp(cfg),
                         two_stream=self.layout.two_stream, output_bias=cfg.model.arch == "bert")

    def forward(self, inputs):  # type: ignore[override]
        inputs = (inputs,) if torch.is_tensor(inputs) else tuple(inputs)
        ids, aux = inputs[0], dict(zip(self.layout.aux_names, inputs[1:]))
        pos = aux.get("position_ids")
        pos = default_position_ids(ids) if pos is None else pos
        out = super().forward(ids, pos, aux.get("token_type_ids"), two_stream=self.layout.two_stream)
        out = (out,) if torch.is_tensor(out) else tuple(out)
        if self.lm_bias is not None:
            # The tied output bias is used only on the last stage; an exact-zero use here gives it a (zero)
            # gradient on the first stage too, so DeepSpeed's tied-gradient all-reduce runs on both stages
            # (it skips None grads, and one-sided collectives deadlock) and both copies stay identical.
            out = (out[0] + 0.0 * self.lm_bias.sum().to(out[0].dtype), *out[1:])
        return (*out, *inputs[1:])


class BlockPipe(Block):
    def __init__(self, cfg: Config, layer: int, inputs: Sequence[str]) -> None:
        self.layout = _Layout(cfg, inputs)
        ckpt = cfg.train.activation_checkpointing
        self.full_recompute = ckpt == "full"
        super().__init__(cfg.model, layer, cfg.train.seed, _sp(cfg), ckpt == "selective")

    def _contexts(self, h: torch.Tensor, aux: dict) -> tuple:
        m = self.layout.cfg.model
        pos = aux.get("position_ids")
        if pos is None:
            seq = h.size(1) * (self.layout.cfg.parallel.tensor if self.sp else 1)
            pos = torch.arange(seq, device=h.device).unsqueeze(0).expand(h.size(0), seq)
        b, s = pos.shape
        rope = (rope_cos_sin(pos, m.hidden_size // m.num_heads, m.rope_base, h.dtype, m.rope_scaling)
                if m.position == "rope" else None)
        if self.layout.two_stream:
            ctx = make_context(build_mask(b, s, False, h.device, attention_mask=aux["content_mask"]), False, rope)
            qctx = make_context(build_mask(b, s, False, h.device, attention_mask=aux["query_mask"]), False, rope)
            return ctx, qctx
        causal = m.arch == "gpt"
        return attention_context(b, s, causal, h.device, rope, segment_ids=aux.get("segment_ids"),
                                 padding_mask=aux.get("padding_mask"), attention_mask=aux.get("attention_mask")), None

    def forward(self, acts):  # type: ignore[override]
        aux = self.layout.aux(acts)
        ctx, qctx = self._contexts(acts[0], aux)
        if self.layout.two_stream:
            h, g = run_block(self, acts[0], ctx, self.full_recompute, acts[1], qctx)
            return (h, g, *acts[2:])
        return (run_block(self, acts[0], ctx, self.full_recompute), *acts[1:])


class FinalNormPipe(nn.Module):
    """GPT: final norm (pre-LN only) and drop the aux tensors; the output is the stream the head reads."""

    def __init__(self, cfg: Config, inputs: Sequence[str]) -> None:
        super().__init__()
        self.layout = _Layout(cfg, inputs)
        self.final_norm = make_norm(cfg.model, _sp(cfg)) if cfg.model.norm_position == "pre" else None

    def forward(self, acts):
        h = acts[1] if self.layout.two_stream else acts[0]
        return self.final_norm(h) if self.final_norm is not None else h


class HeadPipe(nn.Module):
    """GPT's untied output layer."""

    def __init__(self, cfg: Config, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size, self.sp = vocab_size, _sp(cfg)
        self.head = ColumnParallelLinear(cfg.model.hidden_size, padded_vocab_size(vocab_size, cfg), bias=False,
                                         init_std=cfg.model.init_std, seed=param_seed(cfg.train.seed, "head.weight"),
                                         sequence_parallel=self.sp)

    def forward(self, h):
        return vocab_logits(h, self.head.weight, self.vocab_size, self.sp)


class BertHeadPipe(BertHead):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, _sp(cfg))

    def forward(self, acts):  # type: ignore[override]
        x, binary = super().forward(acts[0])
        return (x,) if binary is None else (x, binary)


def _tied_gpt_head(emb: Embedding, h: torch.Tensor) -> torch.Tensor:
    return vocab_logits(h, emb.word.weight, emb.vocab_size_true, emb.sp)


def _tied_bert_head(emb: Embedding, acts: tuple):
    logits = vocab_logits(acts[0], emb.word.weight, emb.vocab_size_true, False, emb.lm_bias)
    return (logits, acts[1]) if len(acts) > 1 else (logits,)


class _TiedEmbeddingPipe(EmbeddingPipe):
    def __init__(self, cfg: Config, vocab_size: int, inputs: Sequence[str]) -> None:
        super().__init__(cfg, vocab_size, inputs)
        self.vocab_size_true = vocab_size


def pipeline_layers(cfg: Config, vocab_size: int, inputs: Optional[Sequence[str]] = None) -> list:
    """LayerSpecs: [embedding, block 0..L-1, final norm (GPT) | BERT head, output head].

    GPT's last layer returns the logits shard; BERT's returns (mlm_logits,
    binary_logits) or (mlm_logits,) without a binary head. ``inputs`` names
    the input tuple (default: ``default_inputs(cfg)``).
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    inputs = tuple(inputs or default_inputs(cfg))
    m = cfg.model
    tied = m.tie_embeddings or m.arch == "bert"
    if tied:
        specs: list = [TiedLayerSpec("embed", _TiedEmbeddingPipe, cfg, vocab_size, inputs, tied_weight_attr=
                                     ["word.weight", "lm_bias"] if m.arch == "bert" else "word.weight")]
    else:
        specs = [LayerSpec(EmbeddingPipe, cfg, vocab_size, inputs)]
    specs += [LayerSpec(BlockPipe, cfg, i, inputs) for i in range(m.num_layers)]
    if m.arch == "bert":
        specs.append(LayerSpec(BertHeadPipe, cfg))
        specs.append(TiedLayerSpec("embed", _TiedEmbeddingPipe, cfg, vocab_size, inputs, forward_fn=_tied_bert_head,
                                   tied_weight_attr=["word.weight", "lm_bias"]))
        return specs
    specs.append(LayerSpec(FinalNormPipe, cfg, inputs))
    if tied:
        specs.append(TiedLayerSpec("embed", _TiedEmbeddingPipe, cfg, vocab_size, inputs, forward_fn=_tied_gpt_head,
                                   tied_weight_attr="word.weight"))
    else:
        specs.append(LayerSpec(HeadPipe, cfg, vocab_size))
    return specs


def pipeline_name_prefixes(cfg: Config) -> list:
    """For layer i of ``pipeline_layers``: the build_model prefix of its params (None: tied copy, no own params)."""
    m = cfg.model
    out = ["embedding."] + [f"layers.{i}." for i in range(m.num_layers)]
    if m.arch == "bert":
        return out + ["head.", None]
    return out + ["", None if m.tie_embeddings else ""]
