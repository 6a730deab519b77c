"""Dropout under a pipeline stays bit-identical when a run is stopped, resumed and recomputed.

Each stage draws its own masks (seeds offset by pipeline rank); the resumed run restores every rank's RNG
states, and starting the data iterators must not draw from them (it did, shifting every later mask).
"""

import pytest

from tests.training.conftest import losses, run_pretrain

DROP = ["parallel.pipeline=2", "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "train.iters=6",
        "checkpoint.save_at_end=false"]


@pytest.mark.slow
def test_pp2_dropout_resumed_with_recompute_is_bit_identical(tiny_data, tmp_path):
    _, plain, _ = run_pretrain(tiny_data, tmp_path / "plain", nproc=2, overrides=DROP)
    again = DROP + ["train.activation_checkpointing=full"]
    run_pretrain(tiny_data, tmp_path / "resumed", nproc=2, overrides=again + ["train.exit_interval=3"])
    _, resumed, _ = run_pretrain(tiny_data, tmp_path / "resumed", nproc=2, overrides=again)
    assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 7))
    assert losses(resumed) == losses(plain)
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in plain]
