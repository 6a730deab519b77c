"""Non-finite loss: the step is skipped (no update, counted, logged); too many in a row -> diagnostic + exit 3."""

import math
import os

import pytest

from tests.training.conftest import run_pretrain

pytestmark = pytest.mark.slow
OBJ = "objective.name=tests.training.nan_objective:NaNOnSteps"


def test_nan_step_is_skipped_and_training_continues(tiny_data, tmp_path):
    _, recs, err = run_pretrain(tiny_data, tmp_path, launcher="python", overrides=[
        OBJ, "objective.options={nan_steps: [3, 4]}", "train.iters=8"])
    steps = {r["step"]: r for r in recs if "loss" in r}
    assert steps[3]["loss"] is None and steps[4]["loss"] is None  # NaN is logged as null
    assert [steps[s]["skipped"] for s in (2, 3, 4, 5, 8)] == [0, 1, 2, 2, 2]  # cumulative count
    assert all(math.isfinite(steps[s]["loss"]) for s in (5, 6, 7, 8))
    assert steps[8]["loss"] < steps[2]["loss"]  # weights were not poisoned
    assert "update skipped" in err


def test_too_many_nan_steps_save_diagnostic_and_exit(tiny_data, tmp_path):
    code, _, err = run_pretrain(tiny_data, tmp_path, launcher="python", check=False, overrides=[
        OBJ, "objective.options={nan_from: 3}", "train.iters=20", "train.max_skipped_steps=3"])
    assert code == 3
    assert "3 consecutive steps had a non-finite loss" in err and "Traceback" not in err
    assert os.path.isdir(tmp_path / "checkpoints" / "step_00000005-diagnostic")
