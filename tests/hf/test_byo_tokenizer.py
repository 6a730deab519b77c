"""Bring your own tokenizer, end to end: a byte-level BPE tokenizer.json trained offline preprocesses the data,
``megalm/pretrain.py --set data.tokenizer=<tokenizer.json>`` trains on separate train/valid/test data, the
checkpoint carries the tokenizer, and AutoTokenizer on the HF export encodes text exactly as training did."""

import json
import os
import subprocess
import sys

import pytest

from tests.training.conftest import FIXTURE_CORPUS, ROOT, run_pretrain

DATA_CORPUS = os.path.join(ROOT, "tests", "data", "fixtures", "corpus.jsonl")


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "megalm.cli", *args], check=True, capture_output=True, env=env)


@pytest.mark.slow
def test_tokenizer_json_trains_exports_and_autotokenizer_agrees(tmp_path):
    import transformers

    from megalm.data.indexed import IndexedDataset
    from megalm.hf.export import export

    tok_dir = str(tmp_path / "tok")
    _cli("train-tokenizer", "--input", FIXTURE_CORPUS, "--model-type", "bytelevel-bpe", "--vocab-size", "600",
         "--output-prefix", tok_dir)
    tok_json = os.path.join(tok_dir, "tokenizer.json")
    prefixes = {}
    for name, src in (("train", FIXTURE_CORPUS), ("heldout", DATA_CORPUS)):
        _cli("preprocess", "--input", src, "--output-prefix", str(tmp_path / name), "--tokenizer-model", tok_json,
             "--append-eod", "--workers", "2", "--no-progress")
        prefixes[name] = str(tmp_path / f"{name}_text_document")
    run = tmp_path / "run"
    _, records, _ = run_pretrain((tok_json, prefixes["train"]), run, launcher="python", overrides=[
        "data.prefix=null", f"data.train={prefixes['train']}", f"data.valid={prefixes['heldout']}",
        f"data.test={prefixes['heldout']}", "train.iters=4", "train.eval_interval=2", "train.eval_iters=1",
        "checkpoint.save_at_end=true", "model.num_layers=2"])
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert [r["step"] for r in records if "test_loss" in r] == [4]
    step_dir = os.path.join(run, "checkpoints", "step_00000004")
    assert os.path.isfile(os.path.join(step_dir, "megalm", "tokenizer.json"))
    hf_dir = str(tmp_path / "hf")
    export(step_dir, hf_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    trained = IndexedDataset(prefixes["heldout"])
    with open(DATA_CORPUS) as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(trained) == len(texts)
    for i, text in enumerate(texts):  # real text the tokenizer never saw in training
        assert hf_tok(text).input_ids + [hf_tok.eos_token_id] == trained[i].tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.config.eos_token_id == hf_tok.eos_token_id
