"""convert-from-hf on checkpoints transformers itself wrote (not megalm exports): GPT-2 base model, Llama,
BertForMaskedLM; and the errors for what it cannot import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megalm.errors import CheckpointError, ConfigError
from megalm.hf.import_hf import import_hf
from tests.hf.conftest import megalm_model

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 300


def _save(model, path):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    model.save_pretrained(str(path))
    return model.eval()


def test_llama_from_transformers_via_cli(tmp_path):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, rope_theta=500000.0)
    hf = _save(transformers.LlamaForCausalLM(config), tmp_path / "hf")
    script = os.path.join(ROOT, "tools", "convert_from_hf.py")
    p = subprocess.run([sys.executable, script, "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "ck"),
                        "--set", "parallel.tensor=2", "model.seq_length=64"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    ours, cfg, vocab = megalm_model(str(tmp_path / "ck"))
    assert (vocab, cfg.model.rope_base, cfg.model.kv_heads, cfg.model.seq_length) == (VOCAB, 500000.0, 2, 64)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert (ours(ids)[..., :VOCAB] - hf(ids).logits).abs().max().item() < 1e-4


def test_gpt2_base_model_without_prefix(tmp_path):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     activation_function="gelu", bos_token_id=2, eos_token_id=3)
    base = _save(transformers.GPT2Model(config), tmp_path / "hf")  # keys "h.0...", "wte.weight": no lm_head
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
    ours, cfg, vocab = megalm_model(str(tmp_path / "ck"))
    assert cfg.model.tie_embeddings and cfg.model.position == "learned"
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        h = base(ids).last_hidden_state
        assert (ours(ids)[..., :VOCAB] - h @ base.wte.weight.T).abs().max().item() < 1e-4


def test_bert_masked_lm_gets_a_fresh_binary_head(tmp_path):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    hf = _save(transformers.BertForMaskedLM(config), tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), ["model.seq_length=64"])
    from megalm.generate import for_inference, repad
    from megalm.build import build_model
    from megalm.training.checkpoint.read_shards import read_full_weights

    cfg, vocab, w = read_full_weights(str(tmp_path / "ck"))
    assert cfg.objective.name == "mlm" and cfg.model.arch == "bert"
    cfg = for_inference(cfg, 1)
    ours = build_model(cfg, vocab)
    ours.load_state_dict(repad(w, vocab, cfg))
    ids = torch.randint(5, VOCAB, (2, 16))
    with torch.no_grad():
        mlm, binary = ours.eval()(ids, token_type_ids=torch.zeros_like(ids))
        assert (mlm[..., :VOCAB] - hf(ids).logits).abs().max().item() < 1e-4
    assert binary.shape == (2, 2)


def test_unsupported_inputs_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        import_hf(str(tmp_path), str(tmp_path / "ck"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ConfigError, match="mistral"):
        import_hf(str(tmp_path), str(tmp_path / "ck"))
    (tmp_path / "config.json").write_text(json.dumps(transformers.GPT2Config(n_layer=1).to_dict()))
    with pytest.raises(ConfigError, match="gelu_new"):  # GPT-2's tanh GELU is not megalm's exact GELU
        import_hf(str(tmp_path), str(tmp_path / "ck"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="safetensors"):
        import_hf(str(tmp_path), str(tmp_path / "ck"), approximate_activation=True)


def test_llama_keeps_its_own_tokenizer_json(tmp_path):
    """Continued pretraining of a foreign Llama preprocesses with the model's tokenizer.json, not a .model."""
    from megalm.config import from_dict
    from megalm.data.tokenizer import load_tokenizer
    from megalm.hf.export import tokenizer_path
    from megalm.data.train_tokenizer import train

    corpus = os.path.join(ROOT, "tests", "data", "fixtures", "corpus.jsonl")
    hf_dir = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=32)
    _save(transformers.LlamaForCausalLM(config), hf_dir)
    tok = train([corpus], str(tmp_path / "tok"), vocab_size=VOCAB, model_type="bytelevel-bpe")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tok.dir, name), "rb") as src, open(hf_dir / name, "wb") as dst:
            dst.write(src.read())
    step_dir = import_hf(str(hf_dir), str(tmp_path / "ck"))
    assert os.path.isfile(os.path.join(step_dir, "megalm", "tokenizer.json"))
    with open(os.path.join(step_dir, "megalm", "megalm_state.json")) as f:
        data_cfg = json.load(f)["config"]["data"]
    assert data_cfg["tokenizer"] == str(hf_dir / "tokenizer.json")
    carried = load_tokenizer(tokenizer_path(step_dir, from_dict({})))  # the checkpoint's copy
    assert carried.kind == "huggingface" and carried.encode("In the beginning") == tok.encode("In the beginning")
    assert carried.eod == tok.eod


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def test_llama3_rope_scaling_matches_transformers_and_round_trips(tmp_path):
    """A Llama-3.1-style rope_parameters imports into model.rope_scaling; the logits at positions past the
    original context (where the scaling acts) equal transformers', plain RoPE would not; export keeps it."""
    from megalm.hf.export import export

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, rope_parameters=dict(LLAMA3_ROPE))
    hf = _save(transformers.LlamaForCausalLM(config), tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), ["model.seq_length=128"])
    ours, cfg, _ = megalm_model(str(tmp_path / "ck"))
    assert cfg.model.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    ids = torch.randint(0, VOCAB, (2, 128))
    with torch.no_grad():
        want = hf(ids).logits
        assert (ours(ids)[..., :VOCAB] - want).abs().max().item() < 1e-4
        import dataclasses

        from megalm.build import build_model
        plain_cfg = cfg.replace(model=dataclasses.replace(cfg.model, rope_scaling=None))
        plain = build_model(plain_cfg, VOCAB)
        plain.load_state_dict(ours.state_dict())
        assert (plain.eval()(ids)[..., :VOCAB] - want).abs().max().item() > 1e-2  # the scaling matters here
    export(str(tmp_path / "ck"), str(tmp_path / "back"))
    with open(tmp_path / "back" / "config.json") as f:
        rope = json.load(f)["rope_parameters"]
    assert {k: rope[k] for k in LLAMA3_ROPE} == LLAMA3_ROPE


@pytest.mark.parametrize("kind", ["yarn", "linear", "dynamic"])
def test_other_rope_scalings_are_refused_by_name(tmp_path, kind):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=64,
                                      rope_parameters={"rope_type": kind, "rope_theta": 10000.0, "factor": 2.0})
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=f"rope scaling '{kind}'; megalm implements only 'llama3'"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
