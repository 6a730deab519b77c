"""``megalm convert-to-hf``: a checkpoint of any TP/PP/ZeRO layout -> a transformers directory (weights + tokenizer).

Reads the layout-independent weights every checkpoint carries (megalm.training.checkpoint.read_shards),
maps them with megalm.hf.mapping (vocabulary padding cut), loads them strictly into
the HF class so nothing is silently left at its random init, and saves with
``save_pretrained`` (safetensors, sharded with an index above --max-shard-size).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Optional

import torch

from megalm.config import Config
from megalm.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PLM_ENCODER, PLM_ENCODER_SWIGLU = "EsmModel", "GemmaModel"
EXPORT_INFO = "megalm_export.json"
# HF class -> model_type for AutoConfig.for_model
MODEL_TYPES = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2", "BertForPreTraining": "bert",
               PLM_ENCODER: "esm", PLM_ENCODER_SWIGLU: "gemma"}


def tokenizer_path(step_dir: str, cfg: Config) -> Optional[str]:
    """The tokenizer saved with the checkpoint (or, failing that, the one the config names)."""
    from megalm.data.tokenizer import saved_tokenizer

    inside = saved_tokenizer(os.path.join(step_dir, "megalm"))
    if inside:
        return inside
    if cfg.data.tokenizer and os.path.exists(cfg.data.tokenizer):
        return cfg.data.tokenizer
    return None


# ---------------------------------------------------------------- PLM backbone -> ESM encoder

def plm_to_hf(weights: dict, cfg: Config, vocab_size: int) -> tuple:
    """The PLM backbone (content stream, full attention) as an HF encoder: (state, config kwargs, class).

    LayerNorm + GELU backbones become ``EsmModel``, RMSNorm + SwiGLU ones a bidirectional ``GemmaModel``.
    """
    m = cfg.model
    left = sorted(k for k in weights if not k.startswith(("layers.", "embedding.word.", "final_norm.",
                                                           "head.final_norm.")))
    if left:
        log.info("PLM encoder export leaves out training-only weights: %s", ", ".join(left))
    if m.norm == "rmsnorm" and m.activation == "swiglu":
        return _plm_to_gemma(weights, cfg, vocab_size)
    return _plm_to_esm(weights, cfg, vocab_size)


def _final_norm(weights: dict) -> str:
    final = "final_norm" if "final_norm.weight" in weights else "head.final_norm"
    if final + ".weight" not in weights:
        raise ConfigError("the PLM checkpoint has no final norm (final_norm / head.final_norm): cannot export the "
                          "content stream")
    return final


def _plm_to_gemma(weights: dict, cfg: Config, vocab_size: int) -> tuple:
    """Gemma with ``use_bidirectional_attention`` is megalm's RoPE/RMSNorm/SwiGLU pre-LN block without a mask.

    Gemma scales its RMSNorm by (1 + w) and its input embeddings by sqrt(hidden): the stored weights are
    w - 1 and E / sqrt(hidden), so the encoder computes the same function (to float rounding).
    """
    m = cfg.model
    cls = PLM_ENCODER_SWIGLU
    for key, value in dict(position="rope", norm_position="pre", bias=False).items():
        if getattr(m, key) != value:
            raise ConfigError(f"the PLM encoder export ({cls}) cannot represent model.{key}={getattr(m, key)!r} "
                              f"exactly (it needs {value!r})")
    if m.num_token_types:
        raise ConfigError(f"{cls} has no token-type embeddings (model.num_token_types={m.num_token_types})")
    if m.rope_scaling:
        raise ConfigError(f"the PLM encoder export ({cls}) cannot represent model.rope_scaling")
    h, f, d = m.hidden_size, m.ffn_size, m.hidden_size // m.num_heads
    final = _final_norm(weights)
    scale = torch.tensor(h ** 0.5, dtype=torch.float32)
    out = {"embed_tokens.weight": weights["embedding.word.weight"][:vocab_size].float() / scale,
           "norm.weight": weights[final + ".weight"] - 1.0}
    for i in range(m.num_layers):
        s, p = f"layers.{i}.", f"layers.{i}."
        q, k, v = weights[s + "attention.qkv.weight"].split([m.num_heads * d, m.kv_heads * d, m.kv_heads * d])
        gate, up = weights[s + "mlp.fc1.weight"].split([f, f])
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v,
                    p + "self_attn.o_proj.weight": weights[s + "attention.out.weight"],
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": weights[s + "mlp.fc2.weight"],
                    p + "input_layernorm.weight": weights[s + "attn_norm.weight"] - 1.0,
                    p + "post_attention_layernorm.weight": weights[s + "mlp_norm.weight"] - 1.0})
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}
    config = dict(vocab_size=vocab_size, hidden_size=h, intermediate_size=f, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads, head_dim=d,
                  hidden_act="silu", hidden_activation="silu", max_position_embeddings=m.max_positions,
                  rms_norm_eps=m.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": m.rope_base},
                  attention_bias=False, attention_dropout=m.attention_dropout, use_bidirectional_attention=True, tie_word_embeddings=True)
    return out, config, cls


def _plm_to_esm(weights: dict, cfg: Config, vocab_size: int) -> tuple:
    """ESM-2's encoder, for LayerNorm + GELU PLM backbones.

    ESM-2's encoder is exactly megalm's pre-LN block with rotate-half RoPE, LayerNorm, GELU and biases,
    plus a final LayerNorm; the query stream, its learned start vector and any heads are training-only.
    """
    m = cfg.model
    need = dict(position="rope", norm="layernorm", activation="gelu", norm_position="pre")
    for key, value in need.items():
        if getattr(m, key) != value:
            raise ConfigError(f"the PLM encoder export ({PLM_ENCODER}) cannot represent "
                              f"model.{key}={getattr(m, key)!r} exactly (it needs {value!r})")
    if m.rope_scaling:
        raise ConfigError(f"the PLM encoder export ({PLM_ENCODER}) cannot represent model.rope_scaling")
    if m.kv_heads != m.num_heads:
        raise ConfigError(f"{PLM_ENCODER} cannot represent grouped-query attention (model.num_kv_heads={m.kv_heads})")
    if m.num_token_types:
        raise ConfigError(f"{PLM_ENCODER} has no token-type embeddings (model.num_token_types={m.num_token_types})")
    final = _final_norm(weights)
    h, f, d = m.hidden_size, m.ffn_size, m.hidden_size // m.num_heads
    out = {"embeddings.word_embeddings.weight": weights["embedding.word.weight"][:vocab_size],
           "encoder.emb_layer_norm_after.weight": weights[final + ".weight"],
           "encoder.emb_layer_norm_after.bias": weights[final + ".bias"]}
    zeros = torch.zeros
    for i in range(m.num_layers):
        s, p = f"layers.{i}.", f"encoder.layer.{i}."
        qkv = weights[s + "attention.qkv.weight"].split([h, h, h])
        qkv_b = weights[s + "attention.qkv.bias"].split([h, h, h]) if m.bias else [zeros(h)] * 3
        for name, w, b in zip(("query", "key", "value"), qkv, qkv_b):
            out[p + f"attention.self.{name}.weight"], out[p + f"attention.self.{name}.bias"] = w, b
        out[p + "attention.output.dense.weight"] = weights[s + "attention.out.weight"]
        out[p + "attention.output.dense.bias"] = weights[s + "attention.out.bias"] if m.bias else zeros(h)
        out[p + "attention.LayerNorm.weight"] = weights[s + "attn_norm.weight"]
        out[p + "attention.LayerNorm.bias"] = weights[s + "attn_norm.bias"]
        out[p + "intermediate.dense.weight"] = weights[s + "mlp.fc1.weight"]
        out[p + "intermediate.dense.bias"] = weights[s + "mlp.fc1.bias"] if m.bias else zeros(f)
        out[p + "output.dense.weight"] = weights[s + "mlp.fc2.weight"]
        out[p + "output.dense.bias"] = weights[s + "mlp.fc2.bias"] if m.bias else zeros(h)
        out[p + "LayerNorm.weight"] = weights[s + "mlp_norm.weight"]
        out[p + "LayerNorm.bias"] = weights[s + "mlp_norm.bias"]
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}
    config = dict(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                  intermediate_size=f, hidden_dropout_prob=m.hidden_dropout,
                  attention_probs_dropout_prob=m.attention_dropout, max_position_embeddings=m.max_positions + 2,
                  position_embedding_type="rotary", rope_theta=m.rope_base, layer_norm_eps=m.norm_eps,
                  emb_layer_norm_before=False, token_dropout=False, tie_word_embeddings=True, head_dim=d)
    return out, config, PLM_ENCODER


# ---------------------------------------------------------------- the export

def _hf_model(cls: str, config, state: dict):
    """Instantiate ``cls`` and load ``state`` into it; refuse if a weight is missing or left over."""
    import transformers

    model_cls = getattr(transformers, cls)
    model = model_cls(config)
    expected = model.state_dict()
    if cls == PLM_ENCODER:  # ESM's pooler and contact head are not part of megalm's PLM: saved as zeros (untrained)
        state = {**state, **{k: torch.zeros_like(v) for k, v in expected.items()
                             if k.startswith(("contact_head.", "pooler."))}}
    result = model.load_state_dict(state, strict=False)
    # tied copies (filled by tie_weights) and buffers computed from the config
    derived = ("inv_freq",) + (("lm_head.weight", "decoder.weight", "decoder.bias")
                               if getattr(config, "tie_word_embeddings", False) else ())
    tied = {k for k in result.missing_keys if k.endswith(derived)}
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ConfigError(f"{cls} weights do not match the mapping: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(result.unexpected_keys)[:5]} (of {len(expected)})")
    model.tie_weights()
    return model.eval()


def export(checkpoint: str, output: str, step: Optional[int] = None, dtype: str = "fp32",
           max_shard_size: str = "5GB", hf_class: Optional[str] = None) -> str:
    """Write ``output`` (config.json, model.safetensors[.index.json], tokenizer files); returns the HF class."""
    import transformers

    from megalm.hf import mapping
    from megalm.hf.tokenizer import save_tokenizer
    from megalm.training.checkpoint.paths import resolve_step_dir
    from megalm.training.checkpoint.read_shards import read_full_weights

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    step_dir = resolve_step_dir(checkpoint, step)
    cfg, vocab, weights = read_full_weights(step_dir)
    if cfg.objective.name == "plm" and hf_class in (None, PLM_ENCODER, PLM_ENCODER_SWIGLU):
        state, kwargs, cls = plm_to_hf(weights, cfg, vocab)
    else:
        if cfg.objective.name == "plm":
            weights = {k: v for k, v in weights.items() if k != "embedding.query"}
        state, kwargs, cls = mapping.to_hf(weights, cfg, vocab, hf_class)
    os.makedirs(output, exist_ok=True)
    tok = tokenizer_path(step_dir, cfg)
    ids: dict = {}
    if tok:
        ids = save_tokenizer(tok, output, model_max_length=cfg.model.max_positions, bert_pairs=cls == mapping.BERT)
    else:
        log.warning("no tokenizer in %s and data.tokenizer is unset: exporting the model without tokenizer files",
                    step_dir)
    special = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids}
    if cls in (mapping.BERT, PLM_ENCODER, PLM_ENCODER_SWIGLU):
        special.pop("bos_token_id", None)
        special.pop("eos_token_id", None)
        if cls == PLM_ENCODER:
            special["mask_token_id"] = ids.get("mask_token_id")
    config = transformers.AutoConfig.for_model(MODEL_TYPES[cls], architectures=[cls], **kwargs, **special)
    model = _hf_model(cls, config, state)
    model = model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    model.save_pretrained(output, max_shard_size=max_shard_size)
    if cls in (mapping.LLAMA, mapping.GPT2):
        transformers.GenerationConfig(**special).save_pretrained(output)
    info = {"source": os.path.abspath(step_dir), "hf_class": cls, "dtype": dtype, "vocab_size": vocab,
            "megalm_config": cfg.to_dict()}
    with open(os.path.join(output, EXPORT_INFO), "w") as f:
        json.dump(info, f, indent=1)
    log.info("exported %s (%s, vocab %d) to %s as %s", step_dir, dtype, vocab, output, cls)
    return cls


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm convert-to-hf", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (follows 'latest') or a step_XXXXXXXX dir")
    p.add_argument("--step", type=int, default=None, help="export this step instead of the latest")
    p.add_argument("--output", required=True, help="directory to write (created)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size (with an index)")
    p.add_argument("--hf-class", default=None, help="force the HF class (default: the one that fits the config)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not os.path.exists(args.checkpoint):
        raise CheckpointError(f"checkpoint not found: {args.checkpoint}")
    cls = export(args.checkpoint, args.output, args.step, args.dtype, args.max_shard_size, args.hf_class)
    print(f"wrote {args.output} ({cls}, {args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
