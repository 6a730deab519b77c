"""What a checkpoint holds and refuses: one copy of the state (12 bytes/param for fp32 Adam), no pickle
ever read (a planted one cannot run), manifests that escape their directory, run-directory locks,
torn metrics lines and imports over a live run."""

import ast
import glob
import hashlib
import json
import logging
import os
import subprocess
import sys

import pytest

from megalm.errors import CheckpointError
from megalm.training.checkpoint import manifest
from tests.training.conftest import ROOT, losses, run_pretrain

# ~13M parameters: the size for the bytes-per-parameter check
MID = ["model.num_layers=7", "model.hidden_size=384", "model.num_heads=6", "train.iters=4",
       "train.global_batch_size=2", "checkpoint.save_at_end=true"]


class _Plant:
    """Unpickling this writes ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
def test_one_copy_of_state_and_planted_pickles_never_run(tiny_data, tmp_path):
    import torch

    _, first, _ = run_pretrain(tiny_data, tmp_path, overrides=MID, launcher="python")
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    params = json.load(open(tmp_path / "run_info.json"))["param_elements_per_rank"][0]
    assert params > 12_000_000
    on_disk = sum(os.path.getsize(p) for p in glob.glob(str(ckpt / "**"), recursive=True) if os.path.isfile(p))
    # fp32 weights + two fp32 Adam moments = 12 bytes per parameter, written once
    assert on_disk <= 1.10 * 12 * params, f"{on_disk / params:.2f} bytes/param"
    assert not list(ckpt.rglob("*.pt")), "DeepSpeed's pickle files are not written"

    # Plant a pickle where DeepSpeed and older megalm kept theirs, and make the manifest vouch for it.
    marker = str(tmp_path / "PWNED")
    planted = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
               "megalm/rng_rank00000.pt", "layer_01-model_00-model_states.pt"]
    for rel in planted:
        torch.save({"module": _Plant(marker)}, ckpt / rel)
    with pytest.raises(Exception):  # the plant is real: weights_only refuses it ...
        torch.load(ckpt / planted[0], weights_only=True)
    torch.load(ckpt / planted[0], weights_only=False)  # ... and a plain torch.load runs it
    assert os.path.exists(marker)
    os.remove(marker)
    man = json.load(open(ckpt / manifest.MANIFEST))
    for rel in planted:
        man["files"][rel] = {"size": os.path.getsize(ckpt / rel), "sha256": _sha(ckpt / rel)}
    json.dump(man, open(ckpt / manifest.MANIFEST, "w"))

    _, resumed, err = run_pretrain(tiny_data, tmp_path, overrides=[*MID, "train.iters=6"], launcher="python")
    assert not os.path.exists(marker), "a pickle in the checkpoint was executed on resume"
    assert "resumed from" in err and [r["step"] for r in resumed if "loss" in r] == list(range(1, 7))
    assert losses(resumed)[:4] == losses(first)


def test_no_unsafe_torch_load_in_megalm():
    """Every torch.load in the package passes weights_only=True (no code runs from a file)."""
    bad = []
    for path in glob.glob(os.path.join(ROOT, "megalm", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "tools", "**", "*.py"), recursive=True):
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"


def _fake_checkpoint(d, files: dict):
    os.makedirs(d / "megalm", exist_ok=True)
    (d / "megalm" / "w.bin").write_bytes(b"abc")
    (d / manifest.MANIFEST).write_text(json.dumps({"files": files}))


@pytest.mark.parametrize("rel", ["../outside.bin", "/etc/passwd", "megalm/../../x"])
def test_manifest_entries_outside_the_directory_are_refused(tmp_path, rel):
    _fake_checkpoint(tmp_path, {rel: {"size": 3, "sha256": "0" * 64}})
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        manifest.verify(str(tmp_path))


def test_empty_manifest_over_files_is_refused(tmp_path):
    _fake_checkpoint(tmp_path, {})
    with pytest.raises(CheckpointError, match="lists no files"):
        manifest.verify(str(tmp_path))
    ok = {"megalm/w.bin": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}}
    _fake_checkpoint(tmp_path, ok)
    manifest.verify(str(tmp_path))
    (tmp_path / "megalm" / "w.bin").write_bytes(b"abd")
    manifest.verify(str(tmp_path), mode="size")  # size only: not hashed
    with pytest.raises(CheckpointError, match=r"checksum \(SHA-256\)"):
        manifest.verify(str(tmp_path), only=["megalm/w.bin"])


def test_new_manifests_use_xxh3_and_catch_a_changed_byte(tmp_path):
    """What a save writes (XXH3-128 entries) is verified as strictly as the old SHA-256 entries above."""
    import xxhash

    (tmp_path / "megalm").mkdir()
    (tmp_path / "megalm" / "w.bin").write_bytes(b"abc" * 1000)
    manifest.write_manifest(str(tmp_path), {})
    entry = json.loads((tmp_path / manifest.MANIFEST).read_text())["files"]["megalm/w.bin"]
    assert entry == {"size": 3000, "xxh3_128": xxhash.xxh3_128(b"abc" * 1000).hexdigest()}
    manifest.verify(str(tmp_path))
    (tmp_path / "megalm" / "w.bin").write_bytes(b"abc" * 999 + b"abd")
    manifest.verify(str(tmp_path), mode="size")
    with pytest.raises(CheckpointError, match=r"checksum \(XXH3-128\)"):
        manifest.verify(str(tmp_path))
    wait = manifest.check_hashes_in_background(str(tmp_path), ["megalm/w.bin"])
    with pytest.raises(CheckpointError, match="w.bin does not match"):
        wait()


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog, monkeypatch):
    from megalm.training.run_lock import LOCK, RunLock

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = RunLock(str(tmp_path))
    first.acquire()
    with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
        RunLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    holder = {"host": socket.gethostname(), "pid": dead.pid, "slurm_job": None}
    (tmp_path / LOCK).write_text(json.dumps(holder))
    with caplog.at_level(logging.WARNING):
        again = RunLock(str(tmp_path))
        again.acquire()
    assert again.held and "stale lock" in caplog.text
    again.release()


def test_torn_metrics_line_is_repaired_with_a_warning(tmp_path, caplog):
    from megalm.training.metrics import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_bytes(("\n".join(good) + "\n").encode() + b'{"step": 4, "lo' + b"\0" * 50)
    with caplog.at_level(logging.WARNING):
        MetricsWriter(str(tmp_path), enabled=True, tensorboard=False).truncate_after(10)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert "torn" in caplog.text


def test_import_never_repoints_latest_of_an_existing_run(tmp_path):
    from megalm.hf.import_hf import _refuse_existing_run

    _refuse_existing_run(str(tmp_path / "new"))  # a fresh directory is fine
    os.makedirs(tmp_path / "run" / "step_00000010")
    (tmp_path / "run" / "latest").write_text("step_00000010\n")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        _refuse_existing_run(str(tmp_path / "run"))


def test_streamed_shard_is_plain_safetensors_and_hashed_while_written(tmp_path):
    import torch
    from safetensors import safe_open

    from megalm.training.checkpoint.shard_writer import ShardWriter

    tensors = {"a": torch.randn(3, 5), "b/exp_avg": torch.arange(7, dtype=torch.float32),
               "c": torch.tensor([1, 2], dtype=torch.bfloat16)}
    path = str(tmp_path / "x.safetensors")
    w = ShardWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"megalm": "{}"})
    for k, v in tensors.items():
        w.write(k, v)
    size, digest = w.close()
    from megalm.training.checkpoint import checksum

    assert size == os.path.getsize(path) and digest == checksum.of_file(path)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"megalm": "{}"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    w = ShardWriter(str(tmp_path / "y.safetensors"), [("a", torch.float32, (3, 5))])
    with pytest.raises(ValueError, match="expected a"):
        w.write("a", torch.zeros(2))


def test_export_reads_only_verified_weights(tmp_path):
    import torch

    from megalm import config as C
    from megalm.training.checkpoint.from_weights import write_checkpoint
    from megalm.training.checkpoint.read_shards import read_full_weights

    cfg = C.load(None, [])
    step_dir = write_checkpoint(str(tmp_path), cfg, 100, {"w": torch.ones(4, 4), "b": torch.zeros(4)})
    _, _, weights = read_full_weights(str(tmp_path))
    assert torch.equal(weights["w"], torch.ones(4, 4))
    victim = glob.glob(os.path.join(step_dir, "megalm", "weights", "*.safetensors"))[0]
    data = bytearray(open(victim, "rb").read())
    data[-3] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        read_full_weights(str(tmp_path))


def test_written_checkpoint_records_the_tp_split(tmp_path):
    """write_checkpoint (HF imports) stores tensors whole, but with the partition the model splits them by:
    at TP=2 each rank reads its half of the vocabulary, not the whole table (a "dim": None would say
    replicated). Names outside the model's rules stay replicated."""
    import torch

    from megalm import config as C
    from megalm.build import padded_vocab_size
    from megalm.training.checkpoint.from_weights import write_checkpoint
    from megalm.training.checkpoint.paths import read_state
    from megalm.training.checkpoint.read_shards import ShardReader, tensor_index

    cfg = C.load(None, ["model.hidden_size=8", "model.num_heads=2", "parallel.tensor=2"])
    rows = padded_vocab_size(100, cfg)
    word = torch.arange(rows * 8, dtype=torch.float32).reshape(rows, 8)
    step_dir = write_checkpoint(str(tmp_path), cfg, 100, {"embedding.word.weight": word, "b": torch.zeros(4)})
    entries = tensor_index(step_dir, read_state(step_dir))["weights"]
    assert entries["embedding.word.weight"]["partition"] == {"dim": 0, "partitions": [rows]}
    assert entries["b"]["partition"] == {"dim": None, "partitions": None}
    reader = ShardReader(step_dir, entries)
    assert torch.equal(reader.for_rank("embedding.word.weight", 1, 2), word[rows // 2:])
    assert torch.equal(reader.full("embedding.word.weight"), word)
    assert torch.equal(reader.for_rank("b", 1, 2), torch.zeros(4))
