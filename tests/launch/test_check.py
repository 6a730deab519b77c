"""``megalm check``: each rule fails in seconds with a message naming the key and the fix; every model
preset composes with every DeepSpeed preset; pretrain.py refuses bad data before it builds a model."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time

import pytest

from megalm.check import main as check_main
from tests.launch.conftest import REPO

TINY = os.path.join(REPO, "configs", "gpt_tiny.yaml")
MODEL_PRESETS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")) if not p.endswith("base.yaml"))
DS_PRESETS = sorted(glob.glob(os.path.join(REPO, "configs", "ds", "*.json")))


def _check(capsys, *args, data=None, world=2):
    """(exit code, stdout + stderr, seconds) of `megalm check` on gpt_tiny with the fixture data."""
    sets = [f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}"] if data else []
    t0 = time.perf_counter()
    code = check_main([TINY, "--world-size", str(world), "--set", *sets, "train.iters=300", *args])
    seconds = time.perf_counter() - t0
    out = capsys.readouterr()
    return code, out.out + out.err, seconds


def test_a_good_config_is_ready(tiny_data, capsys):
    code, out, seconds = _check(capsys, data=tiny_data)
    assert code == 0, out
    assert "ready on 2 rank(s)" in out and "ok   tokenizer" in out and "ok   memory: estimated" in out
    assert seconds < 5


BAD = {  # name: (--set items, what the message must contain: the key and the fix)
    "odd_blend": (["data.prefix=[0.5, a_text_document, 0.5]"], ["data.prefix", "3 items", "--set 'data.prefix=["]),
    "blend_negative_weight": (["data.prefix=[-1, a, 2, b]"], ["data.prefix", "negative"]),
    "split_string": (["data.split=abc"], ["data.split", "969,30,1"]),
    "split_zero": (["data.split=0,0,0"], ["data.split", "one positive"]),
    "unknown_objective": (["objective.name=causal"], ["objective.name", "clm, mlm, plm"]),
    "mlm_on_gpt": (["objective.name=mlm"], ["objective.name=mlm", "--set model.arch=bert"]),
    "plm_on_bert": (["model.arch=bert", "objective.name=plm"], ["objective.name=plm", "--set model.arch=gpt"]),
    "negative_lr": (["optim.lr=-1e-4"], ["optim.lr", "positive"]),
    "min_lr_above_lr": (["optim.min_lr=1.0"], ["optim.min_lr", "optim.lr"]),
    "beta2_one": (["optim.beta2=1.0"], ["optim.beta2", "[0, 1)"]),
    "negative_warmup": (["optim.warmup_iters=-5"], ["optim.warmup_iters", "at least 0"]),
    "zero_decay_iters": (["optim.decay_iters=0"], ["optim.decay_iters", "at least 1"]),
    "dropout_range": (["model.hidden_dropout=1.5"], ["model.hidden_dropout", "[0, 1)"]),
    "learned_positions_short": (["model.position=learned", "model.max_position_embeddings=128"],
                                ["model.max_position_embeddings", "--set model.max_position_embeddings=256"]),
    "choice_listed": (["model.norm=batchnorm"], ["model.norm", "layernorm, rmsnorm"]),
    "schedule_choice": (["optim.schedule=cosnie"], ["optim.schedule", "constant, linear, cosine"]),
    "heads_vs_tensor": (["parallel.tensor=3"], ["parallel.tensor"]),
    "zero3_with_pipeline": (["zero.stage=3", "parallel.pipeline=2"], ["zero.stage", "--set zero.stage=1"]),
    "keep_zero": (["checkpoint.keep=0"], ["checkpoint.keep", "at least 1"]),
    "user_objective_missing": (["objective.name=no_such_pkg.objectives:Mine"],
                               ["objective.name='no_such_pkg.objectives:Mine'", "PYTHONPATH"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_config_rule_names_key_and_fix(tiny_data, capsys, name):
    sets, wanted = BAD[name]
    code, out, seconds = _check(capsys, *sets, data=tiny_data)
    assert code == 2, out
    for text in wanted:
        assert text in out, (text, out)
    assert seconds < 5


def test_layout_batch_not_divisible_names_the_set(tiny_data, capsys):
    code, out, _ = _check(capsys, data=tiny_data, world=8)  # 16 = global batch; 8 x micro 8 does not divide
    assert code == 2 and "train.global_batch_size" in out and "--set train.micro_batch_size=2" in out, out
    code, out, _ = _check(capsys, "train.micro_batch_size=2", data=tiny_data, world=8)
    assert code == 0, out


def test_world_not_divisible_by_model_parallel(tiny_data, capsys):
    code, out, _ = _check(capsys, "parallel.tensor=2", data=tiny_data, world=3)
    assert code == 2 and "world size 3" in out and "parallel.tensor" in out, out


def test_missing_data_and_tokenizer_are_named(tmp_path, capsys):
    code, out, seconds = _check(capsys, f"data.prefix={tmp_path}/nope_text_document",
                                f"data.tokenizer={tmp_path}/nope.model")
    assert code == 2
    assert f"data.prefix: {tmp_path}/nope_text_document.bin not found" in out and "megalm preprocess" in out
    assert f"data.tokenizer: {tmp_path}/nope.model not found" in out
    assert seconds < 5


def test_every_blend_member_is_opened(tiny_data, tmp_path, capsys):
    code, out, _ = _check(capsys, f"data.prefix=[0.5, {tiny_data['prefix']}, 0.5, {tmp_path}/gone_text_document]",
                          f"data.tokenizer={tiny_data['tokenizer']}")
    assert code == 2 and f"{tmp_path}/gone_text_document.bin not found" in out, out


def test_separate_train_valid_test_data_are_checked(tiny_data, tmp_path, capsys):
    prefix = tiny_data["prefix"]
    code, out, _ = _check(capsys, "data.prefix=null", f"data.train={prefix}", f"data.valid={prefix}", f"data.test={prefix}",
                          f"data.tokenizer={tiny_data['tokenizer']}")
    assert code == 0, out
    code, out, _ = _check(capsys, "data.prefix=null", f"data.train={prefix}", f"data.valid={tmp_path}/gone_text_document",
                          f"data.tokenizer={tiny_data['tokenizer']}")
    assert code == 2 and "data.valid" in out and f"{tmp_path}/gone_text_document.bin not found" in out, out


def test_corrupt_index_is_named(tiny_data, tmp_path, capsys):
    prefix = str(tmp_path / "bad_text_document")
    shutil.copy(tiny_data["prefix"] + ".bin", prefix + ".bin")
    with open(tiny_data["prefix"] + ".idx", "rb") as f:
        blob = f.read()
    with open(prefix + ".idx", "wb") as f:
        f.write(b"XXXXXXXXX" + blob[9:])
    code, out, _ = _check(capsys, f"data.prefix={prefix}", f"data.tokenizer={tiny_data['tokenizer']}")
    assert code == 2 and f"{prefix}.idx: bad magic" in out, out


def test_vocab_smaller_than_tokenizer(tiny_data, capsys):
    code, out, _ = _check(capsys, "model.vocab_size=100", data=tiny_data)
    assert code == 2 and "model.vocab_size (100) is smaller than the tokenizer's vocabulary (600" in out
    assert "--set model.vocab_size=600" in out


def test_cache_dir_must_be_a_writable_directory(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, out, _ = _check(capsys, f"data.cache_dir={blocker}/cache", data=tiny_data)
    assert code == 2 and "data.cache_dir" in out and "is a file, not a directory" in out, out


def test_resume_path_must_exist(tiny_data, tmp_path, capsys):
    code, out, _ = _check(capsys, f"checkpoint.resume={tmp_path}/global_step7", data=tiny_data)
    assert code == 2 and "checkpoint.resume" in out and "--set checkpoint.resume=auto" in out, out


def test_memory_verdict_with_margin(tiny_data, capsys):
    code, out, _ = _check(capsys, "--gpu-mem", "80", data=tiny_data)
    assert code == 0 and "GB of 80 GB per GPU (margin" in out, out
    code, out, _ = _check(capsys, "--gpu-mem", "1", data=tiny_data)  # the assumed 2 GB overhead alone is over
    assert code == 2 and "memory:" in out and "megalm plan" in out, out


def test_warmup_longer_than_the_run_warns(tiny_data, capsys):
    code, out, _ = _check(capsys, "train.iters=10", data=tiny_data)  # gpt_tiny warms up for 20
    assert code == 0 and "WARN schedule: optim.warmup_iters (20) is longer than the run" in out, out


@pytest.mark.parametrize("model", MODEL_PRESETS, ids=os.path.basename)
def test_every_model_preset_composes_with_every_deepspeed_preset(model, tiny_data, capsys):
    """Each pair passes `megalm check` on 64 ranks, or its error names a --set that then makes it pass."""
    for ds in DS_PRESETS:
        args = [model, "--ds-config", ds, "--world-size", "64", "--no-files"]
        code = check_main(args)
        out = capsys.readouterr()
        text = out.out + out.err
        if code != 0:
            fix = text.split("write --set ", 1)
            assert len(fix) == 2, (ds, text)  # the error says what to write
            item = fix[1].split()[0].rstrip(";,")
            code = check_main(args + ["--set", item])
            text = capsys.readouterr()
            assert code == 0, (ds, item, text)


def test_pretrain_refuses_bad_data_before_building_a_model(tiny_data, tmp_path):
    """build_engine is replaced by a bomb: a corrupt dataset must fail first, and good data is opened
    (its index cache written) before the model would be built."""
    bad = str(tmp_path / "bad_text_document")
    shutil.copy(tiny_data["prefix"] + ".bin", bad + ".bin")
    with open(bad + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + b"\x01")  # truncated header
    script = ("import sys, megalm.training.engine as E\n"
              "def bomb(*a, **k):\n    raise SystemExit('model built')\n"
              "E.build_engine = bomb\n"
              "from megalm.pretrain import main\nsys.exit(main(sys.argv[1:]))\n")
    base = ["--config", TINY, "--set", f"data.tokenizer={tiny_data['tokenizer']}", "run.tensorboard=false",
            "train.iters=2", "train.eval_iters=0", "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, *base, f"data.prefix={bad}", f"run.dir={tmp_path}/a"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}.idx: truncated header" in proc.stderr and "model built" not in proc.stderr
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", script, *base, f"data.prefix={tiny_data['prefix']}",
                           f"data.cache_dir={cache}", f"run.dir={tmp_path}/b"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert "model built" in proc.stderr, proc.stderr[-2000:]
    assert glob.glob(str(cache / "GPTDataset_indices" / "*-GPTDataset-train-sample_index.npy"))
