"""run.wandb: a training run logs the same scalars under the same names to W&B as to TensorBoard,
offline when there is no API key or network (`run.wandb.mode: auto`), and a requeue keeps the W&B run."""

from __future__ import annotations

import glob
import json
import os
import struct

import pytest

from tests.training.conftest import run_pretrain

wandb = pytest.importorskip("wandb", reason="the wandb extra is part of megalm[test]")
pytestmark = pytest.mark.slow


def _wandb_history(run_file: str) -> dict[int, dict]:
    """step -> logged scalars, read from an offline run's .wandb file (W&B's LevelDB-style record log)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(run_file, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", run_file
    out, pos, block, chunk = {}, 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                out[int(items["_step"])] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


def _tensorboard(run_dir: str) -> dict[int, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    out: dict[int, dict] = {}
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            out.setdefault(ev.step, {})[tag] = ev.value
    return out


def test_wandb_offline_logs_what_tensorboard_logs_and_survives_a_requeue(tiny_data, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: auto must choose offline, no network
    sets = ["run.wandb.project=megalm-test", "run.tensorboard=true", "train.iters=4", "train.exit_interval=2",
            "train.eval_interval=2", "train.eval_iters=1"]
    run_pretrain(tiny_data, tmp_path, overrides=sets)
    run_pretrain(tiny_data, tmp_path, overrides=sets)  # the requeue: resumes at step 2
    with open(tmp_path / "wandb_id.txt") as f:
        run_id = f.read().strip()
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files), files  # one W&B run id
    logged: dict[int, dict] = {}
    for f in sorted(files):
        for step, scalars in _wandb_history(f).items():
            logged.setdefault(step, {}).update(scalars)
    board = _tensorboard(str(tmp_path))
    assert sorted(logged) == sorted(board) == [1, 2, 3, 4]
    for step in board:
        assert set(logged[step]) == set(board[step]), step  # the same names
        for tag, value in board[step].items():
            assert logged[step][tag] == pytest.approx(value, rel=1e-6), (step, tag)
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/eval_loss"} <= set(logged[2])
