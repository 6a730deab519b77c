"""End to end: checkpoints trained by megalm/pretrain.py at TP=1, TP=2 (+SP), PP=2 and TP2xPP2 export
to HF models whose logits match megalm's (1e-4, fp32), and tools/generate.py --greedy (TP=1 and TP=2 under
torchrun) emits the tokens HF model.generate(do_sample=False) does."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from megalm.hf.export import export
from megalm.hf.import_hf import import_hf
from tests.harness import free_port, run_ranks
from tests.hf.conftest import HELD_OUT, held_out_ids, megalm_model, plm_content_logits, run_pretrain

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPT2_STYLE = ["model.position=learned", "model.norm=layernorm", "model.activation=gelu", "model.bias=true",
              "model.tie_embeddings=true"]
LAYOUTS = {  # name -> (ranks, overrides); each also differs in model family so more mappings meet real training
    "tp1": (1, []),
    "tp2": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2", *GPT2_STYLE]),
    "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2", "model.num_kv_heads=2"]),
}
PROMPT = HELD_OUT[:24]  # ~15 tokens: room for 10 more within 32 learned positions


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """name -> (checkpoint root, HF export dir)."""
    out = {}
    for name, (nproc, sets) in LAYOUTS.items():
        run = tmp_path_factory.mktemp(name)
        run_pretrain(tiny_data, run, nproc, ["checkpoint.save_at_end=true", "train.iters=3", *sets])
        ckpt = os.path.join(str(run), "checkpoints")
        hf_dir = str(run / "hf")
        export(ckpt, hf_dir)
        out[name] = (ckpt, hf_dir)
    return out


def _generate_cli(ckpt: str, nproc: int, new: int = 10) -> dict:
    script = os.path.join(ROOT, "tools", "generate.py")
    args = ["--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", str(new), "--greedy", "--json"]
    cmd = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(free_port()), script]
    p = subprocess.run(cmd + args, capture_output=True, text=True, timeout=180, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_export_logits_match_megalm(trained, name):
    ckpt, hf_dir = trained[name]
    ours, cfg, vocab = megalm_model(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert hf.config.vocab_size == vocab
    ids = held_out_ids(cfg.data.tokenizer, n=32, batch=2)
    with torch.no_grad():
        diff = (ours(ids)[..., :vocab] - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, f"{name}: max |logit diff| {diff}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_greedy_generate_matches_hf(trained, name):
    ckpt, hf_dir = trained[name]
    out = _generate_cli(ckpt, 1)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert out["prompt_ids"] == tok(PROMPT)["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = torch.tensor([out["prompt_ids"]])
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10)
    assert out["output_ids"] == ref[0, prompt.size(1):].tolist()[:len(out["output_ids"])]
    assert len(out["output_ids"]) == 10 or out["output_ids"][-1] == tok.eos_token_id


def test_tensor_parallel_generate_matches_hf(trained):
    """tools/generate.py on 2 ranks (TP=2 under torchrun) from a TP2xPP2 checkpoint: HF's greedy tokens."""
    ckpt, hf_dir = trained["tp2_pp2"]
    out = _generate_cli(ckpt, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = torch.tensor([out["prompt_ids"]])
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10)
    assert out["output_ids"] == ref[0, prompt.size(1):].tolist()[:len(out["output_ids"])]


def _tp2_logits(rank, world_size, ckpt, ids):
    from megalm.generate import load_model

    model, cfg, vocab, _ = load_model(ckpt, tensor=world_size)
    with torch.no_grad():
        local = model(ids)
    parts = [torch.empty_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(parts, local)
    return torch.cat(parts, dim=-1)[..., :vocab]


def test_megalm_at_tp2_matches_export(trained):
    """megalm's own TP=2 forward (vocab-parallel logits gathered) against the HF export of a TP2xPP2 run."""
    ckpt, hf_dir = trained["tp2_pp2"]
    _, cfg, _ = megalm_model(ckpt)
    ids = held_out_ids(cfg.data.tokenizer, n=32, batch=2)
    logits = run_ranks(_tp2_logits, 2, ckpt, ids)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        assert (logits - hf(ids).logits).abs().max().item() < 1e-4


def test_trained_round_trip_and_resume(trained, tiny_data, tmp_path):
    """HF -> megalm (TP2xPP2) -> HF is bit-identical; pretrain.py (here at PP2) continues from the imported weights."""
    from safetensors.torch import load_file

    _, hf_dir = trained["tp2"]
    ckpt = str(tmp_path / "imported")
    import_hf(hf_dir, ckpt, ["parallel.tensor=2", "parallel.pipeline=2"])
    export(ckpt, str(tmp_path / "again"))
    a = load_file(os.path.join(hf_dir, "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    run = tmp_path / "resume"
    _, records, _ = run_pretrain(tiny_data, run, 2, ["parallel.pipeline=2", "train.iters=2",
                                                     f"checkpoint.resume={ckpt}/step_00000000"])
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] < 6.25, losses  # continues from the trained weights (a fresh init starts near ln(600)=6.40)


def test_pipeline_offline(trained, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, hf_dir = trained["pp2"]
    assert not glob.glob(os.path.join(hf_dir, "*.bin"))
    pipe = transformers.pipeline("text-generation", model=hf_dir, device="cpu")
    text = pipe(PROMPT, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith(PROMPT)


ENCODER_STYLE = ["model.position=learned", "model.norm=layernorm", "model.activation=gelu", "model.bias=true",
                 "model.tie_embeddings=true"]


@pytest.fixture(scope="module")
def sentence_data(tiny_data, tmp_path_factory):
    """(tokenizer, sentence-split dataset prefix) for BERT pairs, from the same fixture corpus."""
    out = tmp_path_factory.mktemp("sentences")
    corpus = os.path.join(ROOT, "tests", "fixtures", "kjv_small.jsonl")
    subprocess.run([sys.executable, "-m", "megalm.cli", "preprocess", "--input", corpus, "--split-sentences",
                    "--tokenizer-model", tiny_data[0], "--output-prefix", str(out / "kjv"), "--workers", "1",
                    "--no-progress"], check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return tiny_data[0], str(out / "kjv_text_sentence")


def test_trained_bert_pp2_exports_as_bert_for_pretraining(sentence_data, tmp_path):
    from tests.hf.test_export import megalm_model_bert

    run_pretrain(sentence_data, tmp_path, 2, ["checkpoint.save_at_end=true", "train.iters=2", "objective.name=mlm",
                                              "model.arch=bert", "model.norm_position=post", "parallel.pipeline=2",
                                              *ENCODER_STYLE])
    export(str(tmp_path / "checkpoints"), str(tmp_path / "hf"))
    ours, cfg, vocab = megalm_model_bert(str(tmp_path / "checkpoints"))
    hf = transformers.AutoModelForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "BertForPreTraining"
    ids = held_out_ids(cfg.data.tokenizer, n=32, batch=2)
    types = torch.zeros_like(ids)
    types[:, 16:] = 1
    with torch.no_grad():
        mlm, binary = ours(ids, token_type_ids=types)
        out = hf(input_ids=ids, token_type_ids=types)
    assert (mlm[..., :vocab] - out.prediction_logits).abs().max().item() < 1e-4
    assert (binary - out.seq_relationship_logits).abs().max().item() < 1e-4


def test_trained_plm_tp2_exports_content_stream(tiny_data, tmp_path):
    from tests.hf.test_export import megalm_model_bert

    run_pretrain(tiny_data, tmp_path, 2, ["checkpoint.save_at_end=true", "train.iters=2", "objective.name=plm",
                                          "parallel.tensor=2", "model.norm=layernorm", "model.activation=gelu",
                                          "model.bias=true", "model.tie_embeddings=true"])
    export(str(tmp_path / "checkpoints"), str(tmp_path / "hf"))
    ours, cfg, vocab = megalm_model_bert(str(tmp_path / "checkpoints"))
    enc = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(enc).__name__ == "EsmModel"
    ids = held_out_ids(cfg.data.tokenizer, n=32, batch=2)
    ref = plm_content_logits(ours, ids, vocab)
    with torch.no_grad():
        logits = enc(input_ids=ids).last_hidden_state @ enc.get_input_embeddings().weight.T
    assert (ref - logits).abs().max().item() < 1e-4
