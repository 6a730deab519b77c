"""The same model as a flat list of DeepSpeed pipe layers: embedding, blocks, final norm (GPT) | BERT head, head.

Each pipe layer *is* the model's module (a subclass that only adds the adapter's
``forward``), so parameter names inside a layer equal build_model's under a prefix
(``pipeline_name_prefixes``) and the init pass gives them the same weights.
Activations between layers are one tuple of tensors: ``(hidden, [query stream g,]
*inputs[1:])``: the first stage's named inputs travel on, so every block rebuilds
its attention context (``megalm.model.context.contexts``) from tensors alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from megalm.config import Config, ModelConfig
from megalm.errors import ConfigError
from megalm.model.bert import BertHead, bert_logits
from megalm.model.block import Block
from megalm.model.context import MODEL_INPUTS, contexts
from megalm.model.embedding import Embedding, vocab_logits
from megalm.model.gpt import final_norm, output_head
from megalm.model.init import init_weights
from megalm.parallel import state


class Acts:
    """Packs and unpacks DeepSpeed's activation tuple: the stream(s), then the named inputs after input_ids."""

    def __init__(self, inputs: Sequence[str], query_stream: bool) -> None:
        unknown = [n for n in inputs if n not in MODEL_INPUTS]
        if unknown or not inputs or inputs[0] != "input_ids":
            raise ConfigError(f"pipeline inputs must start with input_ids and use only {MODEL_INPUTS}; got {inputs}")
        self.inputs, self.streams = tuple(inputs), 2 if query_stream else 1

    def split(self, acts: tuple) -> tuple:
        """(h or (h, g), {input name: tensor})."""
        x = acts[0] if self.streams == 1 else tuple(acts[:2])
        return x, dict(zip(self.inputs[1:], acts[self.streams:]))

    def join(self, x, acts: tuple) -> tuple:
        return ((x,) if torch.is_tensor(x) else tuple(x)) + tuple(acts[self.streams:])


class EmbeddingPipe(Embedding):
    def __init__(self, m: ModelConfig, vocab_size: int, padded_vocab: int, acts: Acts, seed: int) -> None:
        super().__init__(m, vocab_size, padded_vocab, query_stream=acts.streams == 2, output_bias=m.arch == "bert")
        self.acts = acts
        init_weights(self, m, vocab_size, seed, "embedding.")

    def forward(self, inputs):  # type: ignore[override]
        inputs = (inputs,) if torch.is_tensor(inputs) else tuple(inputs)
        named = dict(zip(self.acts.inputs, inputs))
        x = super().forward(named["input_ids"], named.get("position_ids"), named.get("token_type_ids"),
                            two_stream=self.acts.streams == 2)
        if self.lm_bias is not None:
            # The tied output bias is used only on the last stage; an exact-zero use here gives it a (zero)
            # gradient on the first stage too, so DeepSpeed's tied-gradient all-reduce runs on both stages
            # (it skips None grads, and one-sided collectives deadlock) and both copies stay identical.
            x = x + 0.0 * self.lm_bias.sum().to(x.dtype)
        return ((x,) if torch.is_tensor(x) else tuple(x)) + inputs[1:]


class BlockPipe(Block):
    def __init__(self, m: ModelConfig, layer: int, acts: Acts, seed: int) -> None:
        super().__init__(m)
        self.m, self.acts = m, acts
        init_weights(self, m, 0, seed, f"layers.{layer}.")

    def forward(self, acts):  # type: ignore[override]
        x, named = self.acts.split(acts)
        h = acts[0]
        seq = h.size(1) * (state.tensor_size() if self.sp else 1)
        ctx, qctx = contexts(self.m, h.size(0), seq, h.device, h.dtype, named)
        return self.acts.join(super().forward(x, ctx, qctx), acts)


class FinalNormPipe(nn.Module):
    """GPT: final norm (pre-LN only) and drop the inputs; the output is the stream the head reads."""

    def __init__(self, m: ModelConfig, acts: Acts) -> None:
        super().__init__()
        self.acts, self.final_norm = acts, final_norm(m)

    def forward(self, acts):
        h = acts[self.acts.streams - 1]
        return self.final_norm(h) if self.final_norm is not None else h


class HeadPipe(nn.Module):
    """GPT's untied output layer."""

    def __init__(self, m: ModelConfig, vocab_size: int, padded_vocab: int, seed: int) -> None:
        super().__init__()
        self.vocab_size, self.head, self.sp = vocab_size, output_head(m, padded_vocab), state.sequence_parallel()
        init_weights(self, m, vocab_size, seed)

    def forward(self, h):
        return vocab_logits(h, self.head.weight, self.vocab_size, self.sp)


class BertHeadPipe(BertHead):
    def __init__(self, m: ModelConfig, binary_head: bool, seed: int) -> None:
        super().__init__(m, binary_head)
        init_weights(self, m, 0, seed, "head.")

    def forward(self, acts):  # type: ignore[override]
        x, binary = super().forward(acts[0])
        return (x,) if binary is None else (x, binary)


def _tied_gpt_head(emb: Embedding, h: torch.Tensor) -> torch.Tensor:
    return vocab_logits(h, emb.word.weight, emb.vocab_size, emb.sp)


def _tied_bert_head(emb: Embedding, acts: tuple):
    return (bert_logits(emb, acts[0]), *acts[1:])


def pipeline_layers(m: ModelConfig, vocab_size: int, padded_vocab: int, inputs: Sequence[str], seed: int,
                    query_stream: bool = False, binary_head: bool = False) -> list:
    """LayerSpecs: [embedding, block 0..L-1, final norm (GPT) | BERT head, output head].

    GPT's last layer returns the logits shard; BERT's returns (mlm_logits,
    binary_logits) or (mlm_logits,) without a binary head. ``inputs`` names
    the first stage's input tuple.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    acts = Acts(inputs, query_stream)
    emb_args = (EmbeddingPipe, m, vocab_size, padded_vocab, acts, seed)
    tied_attr = ["word.weight", "lm_bias"] if m.arch == "bert" else "word.weight"
    tied = m.tie_embeddings or m.arch == "bert"
    specs: list = [TiedLayerSpec("embed", *emb_args, tied_weight_attr=tied_attr) if tied else LayerSpec(*emb_args)]
    specs += [LayerSpec(BlockPipe, m, i, acts, seed) for i in range(m.num_layers)]
    if m.arch == "bert":
        return specs + [LayerSpec(BertHeadPipe, m, binary_head, seed),
                        TiedLayerSpec("embed", *emb_args, forward_fn=_tied_bert_head, tied_weight_attr=tied_attr)]
    specs.append(LayerSpec(FinalNormPipe, m, acts))
    if tied:
        return specs + [TiedLayerSpec("embed", *emb_args, forward_fn=_tied_gpt_head, tied_weight_attr=tied_attr)]
    return specs + [LayerSpec(HeadPipe, m, vocab_size, padded_vocab, seed)]


def pipeline_name_prefixes(cfg: Config) -> list:
    """For layer i of ``pipeline_layers``: the build_model prefix of its params (None: tied copy, no own params)."""
    m = cfg.model
    out = ["embedding."] + [f"layers.{i}." for i in range(m.num_layers)]
    if m.arch == "bert":
        return out + ["head.", None]
    return out + ["", None if m.tie_embeddings else ""]
