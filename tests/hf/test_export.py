"""convert-to-hf: the export loads with Auto* classes offline and reproduces megalm's logits (fp32, 1e-4);
refusals name the feature; the round trip megalm -> HF -> megalm -> HF is bit-identical."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from megalm.errors import ConfigError
from megalm.hf.export import export
from megalm.hf.import_hf import import_hf
from tests.hf.conftest import HELD_OUT, make_checkpoint, megalm_model, plm_content_logits

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def _ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(7, vocab, (2, 24), generator=g)


def _safetensors(d: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "gpt2"])
def test_causal_lm_logits_match(exported, kind):
    ckpt, hf_dir = exported[kind]
    ours, cfg, vocab = megalm_model(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel"}.get(kind, "LlamaForCausalLM")
    assert hf.config.vocab_size == vocab == 600  # padding (to 608) stripped
    ids = _ids(vocab)
    with torch.no_grad():
        a, b = ours(ids)[..., :vocab], hf(ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL
    assert a.abs().max().item() > 1.0  # not a trivially small signal


def test_bert_exports_as_pretraining_and_masked_lm(exported):
    ckpt, hf_dir = exported["bert"]
    ours, cfg, vocab = megalm_model_bert(ckpt)
    ids = _ids(vocab)
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    with torch.no_grad():
        mlm, binary = ours(ids, token_type_ids=types)
        pre = transformers.AutoModelForPreTraining.from_pretrained(hf_dir).eval()
        out = pre(input_ids=ids, token_type_ids=types)
        masked = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
        mout = masked(input_ids=ids, token_type_ids=types).logits
    assert type(pre).__name__ == "BertForPreTraining" and type(masked).__name__ == "BertForMaskedLM"
    assert (mlm[..., :vocab] - out.prediction_logits).abs().max().item() < TOL
    assert (binary - out.seq_relationship_logits).abs().max().item() < TOL
    assert (mlm[..., :vocab] - mout).abs().max().item() < TOL
    # the tokenizer lays out pairs as megalm's BERT samples: <cls> A <sep> B <sep>, token types 0 / 1
    from megalm.data.tokenizer import Tokenizer

    sp = Tokenizer(cfg.data.tokenizer)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    enc = tok("In the beginning", "God created")
    a, b = sp.encode("In the beginning"), sp.encode("God created")
    assert enc["input_ids"] == [sp.cls] + a + [sp.sep] + b + [sp.sep]
    assert enc["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert tok("In the beginning", add_special_tokens=False)["input_ids"] == a
    fill = transformers.pipeline("fill-mask", model=hf_dir, device="cpu")
    assert len(fill(f"In the {tok.mask_token} God created", top_k=3)) == 3


def megalm_model_bert(ckpt):
    from megalm.generate import for_inference, repad
    from megalm.build import build_model
    from megalm.training.checkpoint.read_shards import read_full_weights

    cfg, vocab, w = read_full_weights(ckpt)
    cfg = for_inference(cfg, 1)
    model = build_model(cfg, vocab)
    model.load_state_dict(repad(w, vocab, cfg))
    return model.eval(), cfg, vocab


@pytest.mark.parametrize("kind, cls", [("plm", "EsmModel"), ("plm_swiglu", "GemmaModel")])
def test_plm_backbone_exports_as_encoder_content_stream(exported, kind, cls):
    """The encoder's last hidden state x the tied embedding == megalm's content stream under full attention."""
    ckpt, hf_dir = exported[kind]
    ours, cfg, vocab = megalm_model_bert(ckpt)
    ids = _ids(vocab)
    ref = plm_content_logits(ours, ids, vocab)
    with torch.no_grad():
        enc = transformers.AutoModel.from_pretrained(hf_dir).eval()
        hidden = enc(input_ids=ids).last_hidden_state
    assert type(enc).__name__ == cls
    emb = enc.get_input_embeddings()
    table = emb.weight * getattr(emb, "embed_scale", 1.0)  # Gemma stores E / sqrt(hidden)
    logits = hidden @ table.T
    assert (ref - logits).abs().max().item() < TOL
    with torch.no_grad():  # bidirectional: the first position sees the last token
        other = ids.clone()
        other[:, -1] = (other[:, -1] + 1) % vocab
        assert (enc(input_ids=other).last_hidden_state[:, 0] - hidden[:, 0]).abs().max() > 1e-4


def test_files_sharding_and_generation_config(exported):
    _, hf_dir = exported["llama"]
    names = set(os.listdir(hf_dir))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= names
    index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= names  # 100KB shards
    gen = json.load(open(os.path.join(hf_dir, "generation_config.json")))
    assert gen["eos_token_id"] == 3 and gen["bos_token_id"] == 2 and gen["pad_token_id"] == 0
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False


def test_bf16_export(exported, tmp_path):
    ckpt, _ = exported["gpt2"]
    export(ckpt, str(tmp_path / "bf16"), dtype="bf16")
    tensors = _safetensors(str(tmp_path / "bf16"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32)
    ours, _, vocab = megalm_model(ckpt)
    ids = _ids(vocab)
    with torch.no_grad():
        assert (ours(ids)[..., :vocab] - hf(ids).logits).abs().max().item() < 0.1  # bf16 rounding only


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_round_trip_is_bit_identical(exported, tmp_path, kind):
    ckpt, hf_dir = exported[kind]
    import_hf(hf_dir, str(tmp_path / "ckpt"), ["parallel.tensor=2", "parallel.pipeline=2"])
    export(str(tmp_path / "ckpt"), str(tmp_path / "again"))
    a, b = _safetensors(hf_dir), _safetensors(str(tmp_path / "again"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32
        assert torch.equal(a[name].view(torch.int32), b[name].view(torch.int32)), name
    from megalm.training.checkpoint.read_shards import read_full_weights

    cfg, vocab, w = read_full_weights(str(tmp_path / "ckpt"))
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, vocab) == (2, 2, 600)
    assert w["embedding.word.weight"].shape[0] == 608  # padded for TP=2 (multiple of 16 x 2), zero rows
    assert not w["embedding.word.weight"][600:].any()
    assert os.path.isfile(os.path.join(str(tmp_path / "ckpt"), "step_00000000", "megalm", "tokenizer.model"))


def test_pipeline_text_generation_offline(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, hf_dir = exported["llama"]
    pipe = transformers.pipeline("text-generation", model=hf_dir, device="cpu")
    out = pipe(HELD_OUT[:40], max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith(HELD_OUT[:40])


@pytest.mark.parametrize("model, feature", [
    (dict(position="sinusoidal"), "position"),
    (dict(activation="gelu"), "activation"),
    (dict(norm_position="post"), "norm_position"),
])
def test_unrepresentable_config_is_refused_by_name(tmp_path, tok_model, model, feature):
    ckpt = make_checkpoint(tmp_path / "c", "llama_tied", tok_model, **model)
    with pytest.raises(ConfigError, match=feature):
        export(ckpt, str(tmp_path / "out"))
    assert not glob.glob(str(tmp_path / "out" / "*.safetensors"))


def test_gpt2_refuses_gqa_and_plm_refuses_swiglu(tmp_path, tok_model):
    with pytest.raises(ConfigError, match="grouped-query"):
        export(make_checkpoint(tmp_path / "a", "gpt2", tok_model, num_kv_heads=2), str(tmp_path / "oa"))
    with pytest.raises(ConfigError, match="activation"):
        export(make_checkpoint(tmp_path / "b", "plm", tok_model, activation="swiglu"),
               str(tmp_path / "ob"))


def test_cli_errors_name_the_problem(exported, tmp_path):
    import subprocess
    import sys

    ckpt, _ = exported["gpt2"]
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "tools", "convert_to_hf.py")
    p = subprocess.run([sys.executable, script, "--checkpoint", ckpt, "--step", "7", "--output", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "no checkpoint for step 7" in p.stderr and "Traceback" not in p.stderr
    export(ckpt, str(tmp_path / "o"), step=0)
    assert os.path.isfile(tmp_path / "o" / "model.safetensors")
