"""fp16 dynamic loss scaling: megalm's loss_scale.* reach DeepSpeed's DynamicLossScaler, which skips and
halves on overflow (after the hysteresis), grows after a clean window and stops at the minimum.

DeepSpeed refuses fp16 on our CPUs, so the engine path is checked on a GPU (benchmarks/gpu_check.sh);
here we drive the same scaler class DeepSpeed's fp16 optimizers build, from the config users write.
"""

import pytest
import torch

from megalm import config as C
from tests.harness import run_ranks


def make_scaler(*overrides):
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    from megalm.distributed import _disable_cpu_shm_comm

    _disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    cfg = C.load(None, ["precision=fp16", *overrides])
    ds = DeepSpeedConfig(C.deepspeed_config(cfg, 1))
    args = ds.float16_config.dynamic_loss_scale_args()
    return CreateLossScaler(torch.float16, 0, True, args)


def _config_reaches_scaler(rank, world):
    s = make_scaler("loss_scale.initial_scale_power=5", "loss_scale.loss_scale_window=7",
                    "loss_scale.hysteresis=3", "loss_scale.min_loss_scale=4")
    assert (s.cur_scale, s.scale_window, s.delayed_shift, s.min_scale) == (32, 7, 3, 4)


def _overflow_sequence(rank, world):
    # DynamicLossScaler.has_overflow_serial is broken in DeepSpeed 0.19.8 (a method without self);
    # the optimizers use this module-level check.
    from deepspeed.runtime.fp16.loss_scaler import has_inf_or_nan

    s = make_scaler("loss_scale.initial_scale_power=4", "loss_scale.loss_scale_window=3",
                    "loss_scale.hysteresis=2", "loss_scale.min_loss_scale=1")
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    p.grad = torch.tensor([1.0, float("inf"), 0.0], dtype=torch.float16)
    assert has_inf_or_nan(p.grad)  # the check that makes the optimizer skip its step
    s.update_scale(True)
    assert s.cur_scale == 16  # first overflow only spends hysteresis
    s.update_scale(True)
    assert s.cur_scale == 8  # second one halves
    p.grad = torch.ones(3, dtype=torch.float16)
    assert not has_inf_or_nan(p.grad)
    seen = []
    for _ in range(8):
        s.update_scale(False)
        seen.append(s.cur_scale)
    # DeepSpeed counts the window from the step after the overflow: doubles on the 4th, then every 3rd
    assert seen == [8, 8, 8, 16, 16, 16, 32, 32]


def _min_scale(rank, world):
    s = make_scaler("loss_scale.initial_scale_power=2", "loss_scale.hysteresis=1", "loss_scale.min_loss_scale=2")
    s.update_scale(True)
    assert s.cur_scale == 2
    with pytest.raises(Exception, match="minimum"):
        s.update_scale(True)


@pytest.mark.parametrize("check", [_config_reaches_scaler, _overflow_sequence, _min_scale])
def test_dynamic_loss_scaler(check):
    run_ranks(check, 1, timeout=120)  # DeepSpeed's scaler needs its comm backend: one gloo rank


def test_fp16_on_cpu_is_refused_with_a_clear_message(tmp_path):
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 is allowed")
    p = subprocess.run([sys.executable, "megalm/pretrain.py", "--set", "precision=fp16",
                        f"run.dir={tmp_path}", "data.tokenizer=x.model"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "fp16 needs a CUDA GPU" in p.stderr and "Traceback" not in p.stderr
