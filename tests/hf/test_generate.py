"""generate: the KV-cached decode equals the full forward, greedy equals HF model.generate on the export,
sampling options behave, the CLI prints one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megalm.errors import ConfigError
from megalm.generate import Sampling, forward_step, generate, pick
from tests.hf.conftest import held_out_ids, megalm_model

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_kv_cache_matches_full_forward(exported, kind):
    ckpt, _ = exported[kind]
    model, cfg, vocab = megalm_model(ckpt)
    ids = held_out_ids(cfg.data.tokenizer, n=12, batch=1)
    cache = [None] * len(model.layers)
    steps = [forward_step(model, ids[:, :5], 0, cache)]  # prefill, then one token at a time
    for t in range(5, ids.size(1)):
        steps.append(forward_step(model, ids[:, t:t + 1], t, cache))
    with torch.no_grad():
        full = model(ids)[0, 4:, :vocab]
    assert (torch.cat(steps) - full).abs().max().item() < 1e-4
    assert cache[0][0].size(2) == ids.size(1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_equals_hf_generate(exported, kind):
    ckpt, hf_dir = exported[kind]
    model, cfg, vocab = megalm_model(ckpt)
    prompt = held_out_ids(cfg.data.tokenizer, n=10, batch=1)
    ours = generate(model, prompt[0].tolist(), 12, Sampling())
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12)
    n = len(ours)
    assert ours == theirs[0, :n].tolist()
    assert n == 22 or ours[-1] == 3  # stopped at eos only


def test_sampling_options():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, -2.0]])
    g = torch.Generator().manual_seed(1)
    assert pick(logits, Sampling(), g).tolist() == [1]
    assert pick(logits, Sampling(greedy=False, top_k=1), g).tolist() == [1]
    assert pick(logits, Sampling(greedy=False, top_p=0.01), g).tolist() == [1]  # the first token is always kept
    draws = {int(pick(logits, Sampling(greedy=False, top_k=2, temperature=5.0), g)) for _ in range(200)}
    assert draws == {1, 2}  # top-k restricts, a high temperature flattens
    draws = {int(pick(logits, Sampling(greedy=False, top_p=0.9), g)) for _ in range(200)}
    assert draws == {1, 2}  # p(1)=0.70, p(1)+p(2)=0.96 >= 0.9
    a = [int(pick(logits, Sampling(greedy=False), torch.Generator().manual_seed(5))) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw


def test_learned_positions_limit_is_refused(exported):
    ckpt, _ = exported["gpt2"]
    model, cfg, _ = megalm_model(ckpt)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        generate(model, [5] * 30, 10)


def test_cli_json_line(exported):
    ckpt, hf_dir = exported["llama"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--checkpoint", ckpt,
                        "--prompt", "It is a truth universally", "--max-new-tokens", "6", "--greedy", "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert out["prompt_ids"] == tok("It is a truth universally")["input_ids"]
    assert 1 <= len(out["output_ids"]) <= 6 and isinstance(out["text"], str)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = torch.tensor([out["prompt_ids"]])
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6)
    assert ref[0, prompt.size(1):].tolist()[:len(out["output_ids"])] == out["output_ids"]
