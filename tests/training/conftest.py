"""Shared fixtures for end-to-end training tests: a tiny tokenizer + dataset from the real corpus,
and a runner for megalm/pretrain.py under torchrun that returns metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE_CORPUS = os.path.join(ROOT, "tests", "fixtures", "kjv_small.jsonl")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(tokenizer .model path, dataset prefix): a 600-piece BPE on a few KJV chapters."""
    out = tmp_path_factory.mktemp("tiny_data")
    corpus = FIXTURE_CORPUS
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "megalm.cli", "train-tokenizer", "--input", corpus, "--vocab-size", "600",
                    "--output-prefix", str(out / "tok")], check=True, capture_output=True, env=env)
    import numpy as np

    from megalm.data.indexed import IndexedDatasetWriter
    from megalm.data.tokenizer import Tokenizer

    tok = Tokenizer(str(out / "tok.model"))
    writer = IndexedDatasetWriter(str(out / "kjv_text_document"), np.uint16)
    with open(corpus) as f:
        for line in f:
            writer.add_document(tok.encode(json.loads(line)["text"]) + [tok.eod])
    writer.finalize()
    return str(out / "tok.model"), str(out / "kjv_text_document")


TINY = [
    "model.arch=gpt", "model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=32",
    "model.position=rope", "model.norm=rmsnorm", "model.activation=swiglu", "model.tie_embeddings=false",
    "model.make_vocab_size_divisible_by=16", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
    "precision=fp32", "train.iters=10", "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.log_interval=1", "train.eval_interval=1000", "train.eval_iters=0", "optim.lr=3e-3",
    "optim.warmup_iters=2", "optim.clip_grad=1.0", "checkpoint.save_at_end=false", "run.tensorboard=false",
    "train.compile=none",  # eager: compiling costs more than a few tiny steps (tests/model/test_compile.py: default)
]


def run_pretrain(tiny_data, run_dir, nproc: int = 1, overrides=(), timeout: int = 300, check: bool = True,
                 launcher: str = "torchrun"):
    """Run megalm/pretrain.py; return (returncode, metrics records, stderr)."""
    tok, prefix = tiny_data
    sets = TINY + [f"data.tokenizer={tok}", f"data.prefix={prefix}", f"run.dir={run_dir}", *overrides]
    script = os.path.join(ROOT, "megalm", "pretrain.py")
    if nproc == 1 and launcher == "python":
        cmd = [sys.executable, script]
    elif launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(_port()), script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_port()), script]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd + ["--set", *sets], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"pretrain exited {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-6000:]}")
    return p.returncode, read_metrics(run_dir), p.stderr


def read_metrics(run_dir) -> list[dict]:
    path = os.path.join(str(run_dir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(records) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def assert_matches_reference(name: str, records, reference, loss_rtol: float = 1e-4, norm_rtol: float = 1e-3):
    """Same number of steps; every loss and logged gradient norm within the relative tolerances."""
    got, ref = losses(records), losses(reference)
    assert len(got) == len(ref), f"{name}: {len(got)} logged steps vs {len(ref)}"
    for step, (a, b) in enumerate(zip(got, ref), 1):
        assert abs(a - b) <= loss_rtol * abs(b), f"{name}: step {step} loss {a} vs reference {b}\n{got}\n{ref}"
    gn_got = [r["grad_norm"] for r in records if "grad_norm" in r]
    gn_ref = [r["grad_norm"] for r in reference if "grad_norm" in r]
    assert all(g is not None for g in gn_got + gn_ref), f"{name}: a grad norm was not logged"
    for a, b in zip(gn_got, gn_ref):
        assert abs(a - b) <= norm_rtol * abs(b), f"{name}: grad norm {gn_got} vs reference {gn_ref}"


def _port() -> int:
    from tests.harness import free_port

    return free_port()
