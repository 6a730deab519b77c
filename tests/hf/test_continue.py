"""docs/hf.md's continuation recipe, as written: import a small transformers-written Llama with
`--set parallel.tensor=2`, train 3 steps from the config convert-from-hf wrote, then run the same
command again (a requeue) and it resumes from its own step 3, not from the import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.harness import free_port
from tests.training.conftest import ROOT

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

CPU = ["precision=fp32", "zero.stage=0", "train.micro_batch_size=2", "train.global_batch_size=4", "train.iters=6",
       "train.exit_interval=3", "train.eval_iters=0", "train.log_interval=1", "optim.warmup_iters=1",
       "train.activation_checkpointing=none", "run.tensorboard=false"]


def _train(config: str, data_prefix: str, log) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "megalm", "pretrain.py"), "--config", config, "--set", f"data.prefix={data_prefix}", *CPU]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    log.write(proc.stdout + proc.stderr)
    return proc


def test_import_train_requeue_resumes_its_own_step(tiny_data, tmp_path):
    tok, prefix = tiny_data
    config = transformers.LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    shutil.copyfile(tok, tmp_path / "hf" / "tokenizer.model")  # the model's own tokenizer
    out = tmp_path / "runs" / "cont" / "checkpoints"
    p = subprocess.run([sys.executable, "-m", "megalm.cli", "convert-from-hf", "--model", str(tmp_path / "hf"),
                        "--output", str(out), "--set", "parallel.tensor=2"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    ready = out / "continue.yaml"
    with open(ready) as f:
        written = yaml.safe_load(f)
    assert written["extends"] == os.path.join(ROOT, "configs", "gpt_1b.yaml")
    assert (written["model"]["hidden_size"], written["model"]["num_kv_heads"], written["model"]["seq_length"]) == \
        (64, 2, 64)  # the imported shape; gpt_1b's 2048 capped at the model's 64 positions
    assert written["parallel"] == {"tensor": 2} and written["checkpoint"] == {"dir": str(out), "resume": "auto"}
    assert written["data"]["tokenizer"] == str(out / "tokenizer" / "tokenizer.model")
    assert os.path.isfile(out / "tokenizer" / "tokenizer.model")

    with open(tmp_path / "train.log", "w") as log:
        first = _train(str(ready), prefix, log)
        assert first.returncode == 0, first.stderr[-3000:]
        run_dir = tmp_path / "runs" / "cont"
        with open(run_dir / "run_info.json") as f:
            assert json.load(f)["tensor"] == 2  # the --set parallel.tensor=2 given at import
        assert f"resharded {out}/step_00000000 (tensor 1->2" in first.stderr  # started from the import
        assert os.path.isdir(out / "step_00000003")
        again = _train(str(ready), prefix, log)  # the requeue: the same command
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resumed from {out}/step_00000003 at step 3" in again.stderr, again.stderr[-3000:]
    with open(run_dir / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]
