"""megalm <-> Hugging Face weights: names, layouts and configs for Llama, GPT-2 and BERT.

Works on *full* (TP-gathered, TP=1) megalm state dicts; ``shard_state_dict`` /
``gather_state_dicts`` (re-exported from megalm.tp_shard_rules) convert to and
from per-rank shards. The padded vocabulary is cut to the true size on export
and re-padded with zero rows on import. Configs an HF class cannot represent
exactly are refused with a ConfigError naming the feature.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from megalm.config import ROPE_SCALING_KEYS, Config, ModelConfig
from megalm.errors import ConfigError
from megalm.tp_shard_rules import gather_state_dicts, shard_state_dict, tp_rule  # noqa: F401  (re-export)

LLAMA, GPT2, BERT = "LlamaForCausalLM", "GPT2LMHeadModel", "BertForPreTraining"


def _require(m: ModelConfig, cls: str, **want: Any) -> None:
    for key, value in want.items():
        have = getattr(m, key)
        if have != value:
            raise ConfigError(f"{cls} cannot represent model.{key}={have!r} exactly (it needs {value!r})")


def hf_class(cfg: Config) -> str:
    """The HF class that represents ``cfg`` exactly, or ConfigError naming what does not fit."""
    m = cfg.model
    if m.arch == "bert":
        return BERT
    if m.position == "rope":
        return LLAMA
    if m.position == "learned":
        return GPT2
    raise ConfigError(f"no Hugging Face class represents model.position={m.position!r} for arch gpt "
                      "(Llama needs rope, GPT-2 needs learned)")


def _check(cfg: Config, cls: str) -> None:
    m = cfg.model
    if cls == LLAMA:
        _require(m, cls, arch="gpt", position="rope", norm="rmsnorm", activation="swiglu", norm_position="pre")
    elif cls == GPT2:
        _require(m, cls, arch="gpt", position="learned", norm="layernorm", activation="gelu", norm_position="pre",
                 bias=True)
        if m.kv_heads != m.num_heads:
            raise ConfigError(f"{cls} cannot represent grouped-query attention (model.num_kv_heads={m.kv_heads})")
    elif cls == BERT:
        _require(m, cls, arch="bert", position="learned", norm="layernorm", activation="gelu", norm_position="post",
                 bias=True)
        if m.kv_heads != m.num_heads:
            raise ConfigError(f"{cls} cannot represent grouped-query attention (model.num_kv_heads={m.kv_heads})")
        if cfg.objective.binary_head == "none":
            raise ConfigError(f"{cls} has a binary (NSP/SOP) head; objective.binary_head=none has none to export")
        if m.num_token_types < 1:
            raise ConfigError(f"{cls} needs token-type embeddings (model.num_token_types >= 1)")
    else:
        raise ConfigError(f"unknown Hugging Face class {cls!r}; known: {LLAMA}, {GPT2}, {BERT}")


def hf_config(cfg: Config, vocab_size: int, cls: str | None = None) -> dict:
    """Keyword arguments for the transformers config of ``cls`` (LlamaConfig, GPT2Config, BertConfig)."""
    cls = cls or hf_class(cfg)
    _check(cfg, cls)
    m = cfg.model
    if cls == LLAMA:
        out = dict(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
                   num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                   num_key_value_heads=m.kv_heads, head_dim=m.hidden_size // m.num_heads, hidden_act="silu",
                   max_position_embeddings=m.max_positions, rms_norm_eps=m.norm_eps, rope_theta=m.rope_base,
                   tie_word_embeddings=m.tie_embeddings, attention_bias=m.bias, mlp_bias=m.bias,
                   attention_dropout=m.attention_dropout)
        if m.rope_scaling:
            out["rope_parameters"] = {"rope_type": "llama3", "rope_theta": m.rope_base,
                                      **{k: m.rope_scaling[k] for k in ROPE_SCALING_KEYS}}
        return out
    if cls == GPT2:
        return dict(vocab_size=vocab_size, n_positions=m.max_positions, n_embd=m.hidden_size, n_layer=m.num_layers,
                    n_head=m.num_heads, n_inner=m.ffn_size, activation_function="gelu",
                    layer_norm_epsilon=m.norm_eps, resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout,
                    attn_pdrop=m.attention_dropout, tie_word_embeddings=m.tie_embeddings)
    return dict(vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, intermediate_size=m.ffn_size, hidden_act="gelu",
                hidden_dropout_prob=m.hidden_dropout, attention_probs_dropout_prob=m.attention_dropout,
                max_position_embeddings=m.max_positions, type_vocab_size=m.num_token_types,
                layer_norm_eps=m.norm_eps, tie_word_embeddings=True)


def _rope_scaling_from_hf(rope: Mapping[str, Any]) -> dict | None:
    """config.json's rope_parameters (transformers 5) / rope_scaling (4.x) -> model.rope_scaling, or
    ConfigError naming a scaling megalm does not implement (it implements Llama 3's)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConfigError(f"config.json has rope scaling {kind!r}; megalm implements only 'llama3' (Llama 3.1+), "
                          "so the imported model would compute different positions")
    return {"type": "llama3", **{k: rope.get(k) for k in ROPE_SCALING_KEYS}}


def model_config_from_hf(cls: str, hf: Mapping[str, Any]) -> dict:
    """``model.*`` keys (for a megalm Config) that reproduce an HF config dict."""
    if cls == LLAMA:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        return dict(rope_scaling=_rope_scaling_from_hf(rope), arch="gpt", num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                    num_heads=hf["num_attention_heads"],
                    num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                    ffn_hidden_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
                    position="rope", rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                    norm="rmsnorm", norm_eps=hf["rms_norm_eps"], activation="swiglu",
                    bias=bool(hf.get("attention_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings")))
    if cls == GPT2:
        return dict(arch="gpt", num_layers=hf["n_layer"], hidden_size=hf["n_embd"], num_heads=hf["n_head"],
                    ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"], max_position_embeddings=hf["n_positions"],
                    position="learned", norm="layernorm", norm_eps=hf["layer_norm_epsilon"], activation="gelu",
                    bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    if cls == BERT:
        return dict(arch="bert", num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                    num_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
                    max_position_embeddings=hf["max_position_embeddings"], position="learned", norm="layernorm",
                    norm_eps=hf["layer_norm_eps"], norm_position="post", activation="gelu", bias=True,
                    num_token_types=hf["type_vocab_size"], tie_embeddings=True)
    raise ConfigError(f"unknown Hugging Face class {cls!r}; known: {LLAMA}, {GPT2}, {BERT}")


def _layer_names(cls: str, i: int) -> dict:
    """megalm layer-relative name -> HF name, for the entries that map one to one (fused ones aside)."""
    if cls == LLAMA:
        p = f"model.layers.{i}."
        return {"attn_norm.weight": p + "input_layernorm.weight", "mlp_norm.weight": p + "post_attention_layernorm.weight",
                "attention.out.weight": p + "self_attn.o_proj.weight", "attention.out.bias": p + "self_attn.o_proj.bias",
                "mlp.fc2.weight": p + "mlp.down_proj.weight", "mlp.fc2.bias": p + "mlp.down_proj.bias"}
    if cls == GPT2:
        p = f"transformer.h.{i}."
        return {"attn_norm.weight": p + "ln_1.weight", "attn_norm.bias": p + "ln_1.bias",
                "mlp_norm.weight": p + "ln_2.weight", "mlp_norm.bias": p + "ln_2.bias",
                "attention.qkv.weight": p + "attn.c_attn.weight", "attention.qkv.bias": p + "attn.c_attn.bias",
                "attention.out.weight": p + "attn.c_proj.weight", "attention.out.bias": p + "attn.c_proj.bias",
                "mlp.fc1.weight": p + "mlp.c_fc.weight", "mlp.fc1.bias": p + "mlp.c_fc.bias",
                "mlp.fc2.weight": p + "mlp.c_proj.weight", "mlp.fc2.bias": p + "mlp.c_proj.bias"}
    p = f"bert.encoder.layer.{i}."
    return {"attn_norm.weight": p + "attention.output.LayerNorm.weight",
            "attn_norm.bias": p + "attention.output.LayerNorm.bias",
            "attention.out.weight": p + "attention.output.dense.weight",
            "attention.out.bias": p + "attention.output.dense.bias",
            "mlp.fc1.weight": p + "intermediate.dense.weight", "mlp.fc1.bias": p + "intermediate.dense.bias",
            "mlp.fc2.weight": p + "output.dense.weight", "mlp.fc2.bias": p + "output.dense.bias",
            "mlp_norm.weight": p + "output.LayerNorm.weight", "mlp_norm.bias": p + "output.LayerNorm.bias"}


def _split_names(cls: str, i: int) -> dict:
    """Fused megalm entries -> the HF entries they split into (in order)."""
    if cls == LLAMA:
        p = f"model.layers.{i}."
        qkv = [p + f"self_attn.{x}_proj" for x in "qkv"]
        return {"attention.qkv.weight": [n + ".weight" for n in qkv], "attention.qkv.bias": [n + ".bias" for n in qkv],
                "mlp.fc1.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                "mlp.fc1.bias": [p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"]}
    if cls == BERT:
        p = f"bert.encoder.layer.{i}.attention.self."
        return {"attention.qkv.weight": [p + x + ".weight" for x in ("query", "key", "value")],
                "attention.qkv.bias": [p + x + ".bias" for x in ("query", "key", "value")]}
    return {}


def _global_names(cls: str, cfg: Config) -> dict:
    m = cfg.model
    if cls == LLAMA:
        out = {"embedding.word.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
        if not m.tie_embeddings:
            out["head.weight"] = "lm_head.weight"
        return out
    if cls == GPT2:
        out = {"embedding.word.weight": "transformer.wte.weight", "embedding.pos.weight": "transformer.wpe.weight",
               "final_norm.weight": "transformer.ln_f.weight", "final_norm.bias": "transformer.ln_f.bias"}
        if not m.tie_embeddings:
            out["head.weight"] = "lm_head.weight"
        return out
    return {"embedding.word.weight": "bert.embeddings.word_embeddings.weight",
            "embedding.pos.weight": "bert.embeddings.position_embeddings.weight",
            "embedding.token_type.weight": "bert.embeddings.token_type_embeddings.weight",
            "embedding.norm.weight": "bert.embeddings.LayerNorm.weight",
            "embedding.norm.bias": "bert.embeddings.LayerNorm.bias",
            "embedding.lm_bias": "cls.predictions.bias",
            "head.lm_dense.weight": "cls.predictions.transform.dense.weight",
            "head.lm_dense.bias": "cls.predictions.transform.dense.bias",
            "head.lm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
            "head.lm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
            "head.pooler.weight": "bert.pooler.dense.weight", "head.pooler.bias": "bert.pooler.dense.bias",
            "head.binary_head.weight": "cls.seq_relationship.weight",
            "head.binary_head.bias": "cls.seq_relationship.bias"}


_VOCAB_ROWS = ("embedding.word.weight", "head.weight", "embedding.lm_bias")
_GPT2_CONV1D = ("attention.qkv.weight", "attention.out.weight", "mlp.fc1.weight", "mlp.fc2.weight")


def _split_sizes(cfg: Config, name: str) -> list:
    m = cfg.model
    d = m.hidden_size // m.num_heads
    if name.startswith("attention.qkv"):
        return [m.num_heads * d, m.kv_heads * d, m.kv_heads * d]
    return [m.ffn_size, m.ffn_size]


def to_hf(state: Mapping[str, torch.Tensor], cfg: Config, vocab_size: int, cls: str | None = None) -> tuple:
    """(HF state dict, HF config kwargs, HF class name) from a full megalm state dict."""
    cls = cls or hf_class(cfg)
    config = hf_config(cfg, vocab_size, cls)
    out: dict = {}
    used = set()

    def put(src: str, dst: str, t: torch.Tensor) -> None:
        out[dst] = t.detach().clone().contiguous()
        used.add(src)

    for name, dst in _global_names(cls, cfg).items():
        if name in state:
            t = state[name]
            put(name, dst, t[:vocab_size] if name in _VOCAB_ROWS else t)
    for i in range(cfg.model.num_layers):
        pre = f"layers.{i}."
        for name, dst in _layer_names(cls, i).items():
            if pre + name in state:
                t = state[pre + name]
                put(pre + name, dst, t.t() if cls == GPT2 and name in _GPT2_CONV1D else t)
        for name, dsts in _split_names(cls, i).items():
            if pre + name in state:
                for dst, part in zip(dsts, state[pre + name].split(_split_sizes(cfg, name), dim=0)):
                    put(pre + name, dst, part)
    if cls == BERT:
        out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    missing = set(state) - used
    if missing:
        raise ConfigError(f"{cls} has no place for megalm weights {sorted(missing)[:5]}")
    return out, config, cls


def from_hf(hf_state: Mapping[str, torch.Tensor], cfg: Config, vocab_size: int, cls: str | None = None) -> dict:
    """A full megalm state dict (vocabulary padded with zero rows) from an HF state dict."""
    from megalm.build import padded_vocab_size

    cls = cls or hf_class(cfg)
    _check(cfg, cls)
    padded = padded_vocab_size(vocab_size, cfg)
    out: dict = {}

    def get(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise ConfigError(f"Hugging Face {cls} weights lack {name!r}")
        return hf_state[name].detach().clone()

    for name, src in _global_names(cls, cfg).items():
        if name == "embedding.pos.weight" and cfg.model.position != "learned":
            continue
        t = get(src)
        if name in _VOCAB_ROWS:
            t = torch.cat([t, t.new_zeros((padded - t.size(0),) + tuple(t.shape[1:]))])
        out[name] = t
    for i in range(cfg.model.num_layers):
        pre = f"layers.{i}."
        for name, src in _layer_names(cls, i).items():
            if name.endswith(".bias") and not cfg.model.bias and "norm" not in name:
                continue
            t = get(src)
            out[pre + name] = t.t().contiguous() if cls == GPT2 and name in _GPT2_CONV1D else t
        for name, srcs in _split_names(cls, i).items():
            if name.endswith(".bias") and not cfg.model.bias:
                continue
            out[pre + name] = torch.cat([get(s) for s in srcs], dim=0)
    return out
