"""Exact resume from the layout-free state alone: bf16 with ZeRO-3 and async saves continue
bit-identically; a run started from checkpoint.resume=<path> continues from its own checkpoints after a
requeue."""

import pytest

from megalm.training.checkpoint.paths import read_state, resolve_step_dir
from tests.training.conftest import losses, run_pretrain
from tests.training.test_resume import _start, _wait_for_step, kill9

pytestmark = pytest.mark.slow

BASE = ["train.iters=8", "checkpoint.interval=4", "checkpoint.save_at_end=true"]


def test_bf16_zero3_stop_and_resume_is_bit_identical(tiny_data, tmp_path):
    """bf16 module, fp32 masters and moments partitioned over DP (fp32 ZeRO-2 is in test_resume.py)."""
    layout = ["precision=bf16", "zero.stage=3"]
    _, ref, _ = run_pretrain(tiny_data, tmp_path / "ref", nproc=2, overrides=BASE + layout)
    run_dir = tmp_path / "run"
    run_pretrain(tiny_data, run_dir, nproc=2, overrides=BASE + layout + ["train.exit_interval=4"])
    # both ranks read every file and one of them hashes each: a modified one is still caught
    victim = sorted((run_dir / "checkpoints" / "step_00000004" / "megalm" / "optim").iterdir())[-1]
    good = victim.read_bytes()
    victim.write_bytes(good[:-5] + bytes(b ^ 0xFF for b in good[-5:]))
    code, _, err = run_pretrain(tiny_data, run_dir, nproc=2, overrides=BASE + layout, check=False)
    assert code != 0 and victim.name in err and "does not match its checksum" in err, err[-3000:]
    victim.write_bytes(good)
    _, resumed, _ = run_pretrain(tiny_data, run_dir, nproc=2, overrides=BASE + layout)
    assert losses(resumed) == losses(ref)


def test_async_save_kill9_then_resume_is_bit_identical(tiny_data, tmp_path):
    over = ["checkpoint.interval=2", "checkpoint.save_at_end=true", "train.iters=12", "checkpoint.async_save=true",
            "parallel.tensor=2"]
    _, ref, _ = run_pretrain(tiny_data, tmp_path / "ref", nproc=2, overrides=over)
    run_dir = tmp_path / "killed"
    proc = _start(tiny_data, run_dir, 2, over)
    _wait_for_step(proc, run_dir, 7)
    kill9(proc)
    # whatever the kill interrupted, latest names a complete, verifiable checkpoint
    step_dir = resolve_step_dir(str(run_dir / "checkpoints"))
    from megalm.training.checkpoint.manifest import verify

    verify(step_dir)
    _, resumed, _ = run_pretrain(tiny_data, run_dir, nproc=2, overrides=over)
    assert losses(resumed) == losses(ref)
    assert read_state(resolve_step_dir(str(run_dir / "checkpoints")))["step"] == 12


def test_resume_from_path_then_requeue_continues_from_own_checkpoint(tiny_data, tmp_path):
    src = tmp_path / "src"
    run_pretrain(tiny_data, src, overrides=BASE + ["train.exit_interval=4"], launcher="python")
    start = resolve_step_dir(str(src / "checkpoints"))
    over = BASE + [f"checkpoint.resume={start}"]
    run_pretrain(tiny_data, tmp_path / "b", overrides=over + ["train.exit_interval=6", "checkpoint.interval=2"],
                 launcher="python")
    _, recs, err = run_pretrain(tiny_data, tmp_path / "b", overrides=over, launcher="python")  # the requeue
    assert "step_00000006" in err and "resumed from" in err, err[-2000:]
    assert [r["step"] for r in recs if "loss" in r] == list(range(5, 9))
