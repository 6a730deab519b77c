"""Resharding through the layout-independent shards: TP2xPP2 -> TP1xPP1 -> TP2xPP1 keeps the loss."""

import pytest

from megalm.training.checkpoint.paths import read_state, resolve_step_dir
from tests.training.conftest import losses, run_pretrain

pytestmark = pytest.mark.slow


def test_reshard_round_trip_keeps_loss(tiny_data, tmp_path):
    base = ["train.iters=12", "checkpoint.interval=4", "checkpoint.save_at_end=true", "checkpoint.keep=5"]
    _, ref, _ = run_pretrain(tiny_data, tmp_path / "ref", nproc=1, overrides=base)
    ref_losses = losses(ref)

    # Train to step 4 at TP2 x PP2, then continue at TP1 x PP1 to step 8, then at TP2 x PP1 to the end.
    a = tmp_path / "a"
    run_pretrain(tiny_data, a, nproc=4, overrides=base + ["parallel.tensor=2", "parallel.pipeline=2",
                                                          "train.exit_interval=4"])
    assert read_state(resolve_step_dir(str(a / "checkpoints")))["step"] == 4
    _, _, err = run_pretrain(tiny_data, a, nproc=1, overrides=base + ["train.exit_interval=8"], launcher="python")
    assert "resharded" in err and "optimizer state carried over" in err
    assert read_state(resolve_step_dir(str(a / "checkpoints")))["step"] == 8
    _, final, _ = run_pretrain(tiny_data, a, nproc=2, overrides=base + ["parallel.tensor=2"])
    got = losses(final)
    assert len(got) == len(ref_losses)
    for i, (x, y) in enumerate(zip(got, ref_losses), 1):
        assert abs(x - y) <= 1e-5 * abs(y) + 1e-6, f"step {i}: {x} vs {y}\n{got}\n{ref_losses}"


def test_reshard_from_zero2_dp2_to_one_process(tiny_data, tmp_path):
    """ZeRO partitions of weights and Adam moments come back whole through DeepSpeed's full-state API."""
    base = ["train.iters=8", "checkpoint.interval=4", "checkpoint.save_at_end=true"]
    _, ref, _ = run_pretrain(tiny_data, tmp_path / "ref", nproc=1, overrides=base)
    a = tmp_path / "a"
    run_pretrain(tiny_data, a, nproc=2, overrides=base + ["zero.stage=2", "train.exit_interval=4"])
    _, final, err = run_pretrain(tiny_data, a, launcher="python", overrides=base)
    assert "optimizer state carried over" in err
    for i, (x, y) in enumerate(zip(losses(final), losses(ref)), 1):
        assert abs(x - y) <= 1e-5 * abs(y) + 1e-6, f"step {i}: {x} vs {y}"
