"""Logits equal the corresponding transformers model once weights are copied across (fp32)."""

import pytest
import torch

import megalm.config as C
from megalm.errors import ConfigError
from megalm.hf import mapping
from megalm.build import build_model, padded_vocab_size

transformers = pytest.importorskip("transformers")  # the [hf] extra; installed in CI

VOCAB = 100
TINY = dict(num_layers=2, hidden_size=64, num_heads=4, seq_length=16)
CASES = {
    "llama_gqa_tied": dict(arch="gpt", num_kv_heads=2, rope_base=5000.0, norm_eps=1e-6),
    "llama_untied_bias": dict(arch="gpt", tie_embeddings=False, bias=True, ffn_hidden_size=96),
    "gpt2": dict(arch="gpt", position="learned", norm="layernorm", activation="gelu", bias=True,
                 max_position_embeddings=32),
    "gpt2_untied": dict(arch="gpt", position="learned", norm="layernorm", activation="gelu", bias=True,
                        tie_embeddings=False),
    "bert": dict(arch="bert", position="learned", norm="layernorm", norm_position="post", activation="gelu",
                 bias=True, norm_eps=1e-12),
}


def _cfg(case):
    return C.from_dict({"model": {**TINY, **CASES[case]}, "train": {"seed": 5}})


def _hf_model(cls, config):
    conf_cls = {mapping.LLAMA: transformers.LlamaConfig, mapping.GPT2: transformers.GPT2Config,
                mapping.BERT: transformers.BertConfig}[cls]
    model_cls = getattr(transformers, cls)
    return model_cls(conf_cls(**config)).eval()


def _perturb(model):
    """Random norms/biases too, so a swapped or dropped tensor cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    cfg = _cfg(case)
    ours = build_model(cfg, VOCAB).eval()
    _perturb(ours)
    sd = ours.state_dict()
    with torch.no_grad():  # padding rows are not exported; the import pads with zeros
        for name in ("embedding.word.weight", "head.weight", "embedding.lm_bias"):
            if name in sd:
                sd[name][VOCAB:] = 0
    hf_sd, config, cls = mapping.to_hf(sd, cfg, VOCAB)
    hf = _hf_model(cls, config)
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected, unexpected
    tied = {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert not [k for k in missing if not (config["tie_word_embeddings"] and k in tied)], missing

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    with torch.no_grad():
        if cls == mapping.BERT:
            pad = torch.ones(2, 16, dtype=torch.bool)
            pad[1, 11:] = False
            types = (torch.arange(16) >= 6).long().expand(2, 16)
            logits, binary = ours(ids, token_type_ids=types, padding_mask=pad)
            ref = hf(input_ids=ids, token_type_ids=types, attention_mask=pad.long())
            torch.testing.assert_close(binary, ref.seq_relationship_logits, atol=1e-5, rtol=1e-4)
            ref_logits = ref.prediction_logits
            # padded query rows are garbage in both; compare real tokens
            torch.testing.assert_close(logits[pad][..., :VOCAB], ref_logits[pad], atol=1e-5, rtol=1e-4)
        else:
            logits = ours(ids)
            torch.testing.assert_close(logits[..., :VOCAB], hf(input_ids=ids).logits, atol=1e-5, rtol=1e-4)

    back = mapping.from_hf(hf.state_dict(), cfg, VOCAB)
    assert set(back) == set(sd)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], atol=0, rtol=0)


def test_config_round_trip():
    for case in CASES:
        cfg = _cfg(case)
        cls = mapping.hf_class(cfg)
        hf_conf = _hf_model(cls, mapping.hf_config(cfg, VOCAB)).config.to_dict()
        keys = mapping.model_config_from_hf(cls, hf_conf)
        for k, v in keys.items():
            if k in ("max_position_embeddings", "ffn_hidden_size", "num_kv_heads"):
                continue
            assert getattr(cfg.model, k) == v, (case, k)


@pytest.mark.parametrize("change,feature", [
    (dict(arch="gpt", norm="layernorm"), "norm"),
    (dict(arch="gpt", norm_position="post"), "norm_position"),
    (dict(arch="gpt", position="sinusoidal"), "position"),
    (dict(arch="gpt", position="learned", norm="layernorm", activation="gelu", bias=False), "bias"),
    (dict(arch="gpt", position="learned", norm="layernorm", activation="gelu", bias=True, num_kv_heads=2),
     "grouped-query"),
    (dict(arch="bert", position="rope"), "position"),
])
def test_refuses_what_hf_cannot_represent(change, feature):
    cfg = C.from_dict({"model": {**TINY, **change}})
    with pytest.raises(ConfigError, match=feature):
        mapping.hf_config(cfg, VOCAB)


def test_shard_gather_round_trip():
    cfg = C.from_dict({"model": {**TINY, "num_kv_heads": 2, "tie_embeddings": False}, "parallel": {"tensor": 2}})
    full = build_model(C.from_dict({"model": {**TINY, "num_kv_heads": 2, "tie_embeddings": False}}), VOCAB).state_dict()
    assert padded_vocab_size(VOCAB, cfg) == 256
    # pad the TP=1 table (128 rows) to the TP=2 size so it splits evenly
    full = {k: (torch.cat([v, v.new_zeros(256 - v.size(0), *v.shape[1:])]) if k in ("embedding.word.weight",
                                                                                        "head.weight") else v)
            for k, v in full.items()}
    shards = [mapping.shard_state_dict(full, cfg, VOCAB, r, 2) for r in range(2)]
    assert shards[0]["layers.0.attention.qkv.weight"].shape[0] == (64 + 2 * 32) // 2
    # rank 1's slice of a fused QKV holds the second half of Q, K and V each
    q1 = shards[1]["layers.0.attention.qkv.weight"][:32]
    torch.testing.assert_close(q1, full["layers.0.attention.qkv.weight"][32:64])
    back = mapping.gather_state_dicts(shards, cfg, VOCAB)
    for k in full:
        torch.testing.assert_close(back[k], full[k], atol=0, rtol=0)
