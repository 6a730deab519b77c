"""The entry points and what a run leaves behind: deepspeed launcher, plain python, eval records,
TensorBoard files, ZeRO-3 parameter partitioning, and nothing left in /dev/shm."""

import glob
import json
import os

import pytest

from tests.training.conftest import losses, run_pretrain

pytestmark = pytest.mark.slow


def _shm():
    # sem.mp-* are multiprocessing semaphores of whatever else runs on the machine (pytest workers)
    return {p for p in glob.glob("/dev/shm/*") if not os.path.basename(p).startswith("sem.mp-")}


def test_deepspeed_launcher_tp2_with_eval_and_tensorboard(tiny_data, tmp_path):
    before = _shm()
    _, recs, _ = run_pretrain(tiny_data, tmp_path, nproc=2, launcher="deepspeed", overrides=[
        "parallel.tensor=2", "train.iters=6", "train.eval_interval=3", "train.eval_iters=2", "run.tensorboard=true"])
    assert len(losses(recs)) == 6
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(abs(r["eval_ppl"] - 2.718281828 ** r["eval_loss"]) < 1e-6 * r["eval_ppl"] for r in evals)
    for r in recs:
        if "loss" in r:
            assert {"step", "loss", "lr", "grad_norm", "loss_scale", "tokens_per_sec", "tflops", "mfu",
                    "consumed_samples"} <= set(r)
    assert [r for r in recs if "loss" in r][-1]["consumed_samples"] == 6 * 8
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert _shm() - before == set(), "a run left files in /dev/shm"


def test_plain_python_single_process(tiny_data, tmp_path):
    _, recs, _ = run_pretrain(tiny_data, tmp_path, launcher="python", overrides=["train.iters=3"])
    assert len(losses(recs)) == 3


def test_zero3_halves_parameter_memory_per_rank(tiny_data, tmp_path):
    run_pretrain(tiny_data, tmp_path / "one", launcher="python", overrides=["train.iters=1", "zero.stage=3"])
    run_pretrain(tiny_data, tmp_path / "two", nproc=2, overrides=["train.iters=1", "zero.stage=3"])
    one = json.load(open(tmp_path / "one" / "run_info.json"))["param_elements_per_rank"]
    two = json.load(open(tmp_path / "two" / "run_info.json"))["param_elements_per_rank"]
    assert len(one) == 1 and len(two) == 2
    for n in two:
        assert abs(n / one[0] - 0.5) < 0.02, (one, two)


def test_bad_config_key_is_one_clear_line(tiny_data, tmp_path):
    code, _, err = run_pretrain(tiny_data, tmp_path, launcher="python", check=False,
                                overrides=["train.itres=3"])
    assert code == 2 and "did you mean train.iters" in err and "Traceback" not in err


def test_missing_dataset_is_named(tiny_data, tmp_path):
    code, _, err = run_pretrain(tiny_data, tmp_path, launcher="python", check=False,
                                overrides=[f"data.prefix={tmp_path}/nope_text_document"])
    assert code == 2 and "nope_text_document" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "checkpoints")


def test_zero_offload_matches_reference(tiny_data, tmp_path):
    """ZeRO-3 with optimizer and parameters offloaded to the CPU (DeepSpeed's CPU Adam, JIT-built once)."""
    base = ["train.iters=4"]
    _, ref, _ = run_pretrain(tiny_data, tmp_path / "ref", launcher="python", overrides=base)
    _, off, _ = run_pretrain(tiny_data, tmp_path / "off", launcher="python", timeout=600, overrides=base + [
        "zero.stage=3", "zero.offload_optimizer=true", "zero.offload_params=true"])
    for a, b in zip(losses(off), losses(ref)):
        assert abs(a - b) <= 1e-4 * abs(b), (losses(off), losses(ref))
