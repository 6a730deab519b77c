"""Fixtures for the launch tests: one real two-node Slurm cluster per module, stopped by pid afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.launch.slurm_cluster import SlurmCluster, install_packages, missing_requirement

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def slurm_cluster():
    why = missing_requirement()
    if why:
        pytest.skip(f"Slurm cluster tests: {why}")
    install_packages()
    root = tempfile.mkdtemp(prefix="megalm-slurm-")
    cluster = SlurmCluster(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def launch_env():
    """Environment knobs every CPU launch test shares: this checkout, this interpreter, one thread per rank."""
    return {"MEGALM_ROOT": REPO, "MEGALM_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "MEGALM_SRUN_WAIT": "30"}  # a crashed rank ends the step in 30 s, not 300

CORPUS = os.path.join(REPO, "tests", "data", "fixtures", "corpus.jsonl")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """A SentencePiece model and a .bin/.idx dataset from the bundled corpus (well under a second)."""
    import json

    from megalm.data.indexed import write_dataset
    from megalm.data.train_tokenizer import train

    out = tmp_path_factory.mktemp("launch_data")
    tok = train([CORPUS], str(out / "spm"), vocab_size=600, num_threads=1)
    with open(CORPUS) as f:
        texts = [json.loads(line)["text"] for line in f]
    write_dataset(str(out / "corpus_text_document"), [tok.encode(t) + [tok.eod] for t in texts])
    # BERT pairs need one sequence per sentence: what `tools/preprocess.py --split-sentences` writes
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess.py"), "--input", CORPUS,
                    "--split-sentences", "--tokenizer-model", str(out / "spm.model"), "--output-prefix",
                    str(out / "corpus"), "--workers", "1", "--no-progress"], check=True, capture_output=True)
    return {"prefix": str(out / "corpus_text_document"), "tokenizer": str(out / "spm.model"),
            "sentence_prefix": str(out / "corpus_text_sentence")}


def tiny_overrides(data: dict, run_dir: str, iters: int, **extra) -> list[str]:
    """``--set`` items that shrink gpt_tiny to a few-second CPU run logging every step."""
    items = {
        "data.prefix": data["prefix"], "data.tokenizer": data["tokenizer"], "run.dir": run_dir,
        "run.tensorboard": "false", "train.iters": iters, "train.log_interval": 1, "train.eval_iters": 0,
        "model.num_layers": 2, "model.hidden_size": 64, "model.num_heads": 4, "model.seq_length": 64,
        "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.compile": "none", **extra,
    }
    return ["--set", *(f"{k}={v}" for k, v in items.items())]
