"""Checkpoints that never lose work: atomic saves, a verified manifest, exact resume.

A save goes to ``<root>/.tmp-step_N`` (DeepSpeed's files + megalm's state, RNG
per rank, tokenizer copy), is fsynced, listed in MANIFEST.json with sizes and
SHA-256, renamed to ``<root>/step_N``, and only then does ``<root>/latest``
(replaced atomically) point at it. A kill at any moment leaves the previous
checkpoint intact and ``latest`` naming a complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch

import megalm
from megalm.config import Config
from megalm.errors import CheckpointError
from megalm.parallel import comm

logger = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "MANIFEST.json"
STATE = "megalm_state.json"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            if n != MANIFEST:
                out.append(os.path.relpath(os.path.join(d, n), root))
    return sorted(out)


def write_manifest(path: str) -> None:
    entries = {}
    for rel in _files(path):
        full = os.path.join(path, rel)
        with open(full, "rb") as f:
            os.fsync(f.fileno())
        entries[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"megalm_version": megalm.__version__, "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))
    for d, _, _ in os.walk(path):
        _fsync_dir(d)


def verify(path: str, checksums: bool = True) -> None:
    """Raise CheckpointError naming every missing, truncated or altered file of a checkpoint."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete (a save was interrupted?)")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{manifest_path} is corrupt: {e}") from None
    problems = []
    for rel, meta in files.items():
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            problems.append(f"missing {full}")
        elif os.path.getsize(full) != meta["size"]:
            problems.append(f"{full} has {os.path.getsize(full)} bytes, expected {meta['size']} (truncated?)")
        elif checksums and _sha256(full) != meta["sha256"]:
            problems.append(f"{full} does not match its SHA-256 in {MANIFEST} (modified or corrupt)")
    if problems:
        raise CheckpointError(f"checkpoint {path} failed verification:\n  " + "\n  ".join(problems))


def publish(root: str, tmp: str, name: str, state: dict, tokenizer_path: Optional[str] = None,
            update_latest: bool = True) -> str:
    """Finish a checkpoint written into ``tmp``: megalm state, tokenizer copy, fsynced MANIFEST, then the
    rename to ``root/name`` and, last, the atomic ``latest`` pointer. Returns the final path."""
    final = os.path.join(root, name)
    os.makedirs(os.path.join(tmp, "megalm"), exist_ok=True)
    with open(os.path.join(tmp, "megalm", STATE), "w") as f:
        json.dump(state, f, indent=1)
    if tokenizer_path and os.path.exists(tokenizer_path):
        from megalm.data.tokenizer import copy_tokenizer

        copy_tokenizer(tokenizer_path, os.path.join(tmp, "megalm"))  # tokenizer.model | tokenizer.json | vocab+merges
    write_manifest(tmp)
    if os.path.exists(final):  # a re-save of the same step (e.g. after resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    if update_latest:
        pointer_tmp = os.path.join(root, ".latest.tmp")
        with open(pointer_tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(root, "latest"))
        _fsync_dir(root)
    return final


def list_steps(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(root) if (m := STEP_RE.match(n)))


def latest_path(root: str) -> Optional[str]:
    """The checkpoint ``latest`` names, or None when the root holds none."""
    pointer = os.path.join(root, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise CheckpointError(f"{pointer} names {name}, which does not exist in {root}")
    return path


def _rng_state() -> tuple[dict, dict]:
    """(tensors for torch.save, JSON-able states) of every RNG this rank uses."""
    from megalm.parallel import random as tp_random

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    tracker = tp_random.get_tracker().get_states()
    for name, st in tracker.items():
        tensors[f"tracker/{name}"] = st
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, plain


def _set_rng_state(tensors: dict, plain: dict) -> None:
    from megalm.parallel import random as tp_random

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("tracker/")}
    if tracker:
        tp_random.get_tracker().set_states(tracker)
    py = plain["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = plain["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly."""

    def __init__(self, cfg: Config, engine: Any, rank: int, world_size: int, tokenizer_path: Optional[str] = None):
        self.cfg = cfg
        self.engine = engine  # megalm.training.engine.Engine
        self.rank = rank
        self.world_size = world_size
        self.root = cfg.checkpoint_dir
        self.tokenizer_path = tokenizer_path
        self.consumed_samples = 0

    def _barrier(self) -> None:
        comm.barrier()

    def save(self, step: int, diagnostic: bool = False) -> str:
        name = step_name(step) + ("-diagnostic" if diagnostic else "")
        tmp_name = ".tmp-" + name
        tmp = os.path.join(self.root, tmp_name)
        final = os.path.join(self.root, name)
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        self.engine.ds.save_checkpoint(self.root, tag=tmp_name, save_latest=False)
        from megalm.training import universal

        universal.save_shards(self.engine, self.cfg, tmp)
        os.makedirs(os.path.join(tmp, "megalm"), exist_ok=True)
        tensors, plain = _rng_state()
        torch.save(tensors, os.path.join(tmp, "megalm", f"rng_rank{self.rank:05d}.pt"))
        with open(os.path.join(tmp, "megalm", f"rng_rank{self.rank:05d}.json"), "w") as f:
            json.dump(plain, f)
        self._barrier()
        if self.rank == 0:
            state = {
                "step": step,
                "consumed_samples": self.consumed_samples,
                "world_size": self.world_size,
                "tensor": self.cfg.parallel.tensor,
                "pipeline": self.cfg.parallel.pipeline,
                "zero_stage": self.cfg.zero.stage,
                "megalm_version": megalm.__version__,
                "config": self.cfg.to_dict(),
            }
            publish(self.root, tmp, name, state, self.tokenizer_path, update_latest=not diagnostic)
            if not diagnostic:
                self._prune(step)
            logger.info(f"saved checkpoint {final}")
        self._barrier()
        return final

    def _prune(self, current: int) -> None:
        keep, every = self.cfg.checkpoint.keep, self.cfg.checkpoint.keep_every
        steps = [s for s in list_steps(self.root) if s <= current]
        for s in steps[:-keep] if keep > 0 else []:
            if every and s % every == 0:
                continue
            shutil.rmtree(os.path.join(self.root, step_name(s)), ignore_errors=True)
        for n in os.listdir(self.root):  # leftovers of saves that were killed
            if n.startswith(".tmp-") and n != ".tmp-" + step_name(current):
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    def resolve_resume(self) -> Optional[str]:
        how = self.cfg.checkpoint.resume
        if how == "none":
            return None
        if how == "auto":
            return latest_path(self.root)
        path = how
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint.resume={how!r}: no such checkpoint directory")
        return path

    def load(self) -> tuple[int, int]:
        """Restore the newest checkpoint (if any); return (step, consumed_samples)."""
        path = self.resolve_resume()
        if path is None:
            return 0, 0
        verify(path)
        with open(os.path.join(path, "megalm", STATE)) as f:
            state = json.load(f)
        saved = (state["tensor"], state["pipeline"], state["world_size"], state["zero_stage"])
        now = (self.cfg.parallel.tensor, self.cfg.parallel.pipeline, self.world_size, self.cfg.zero.stage)
        if saved != now or state.get("universal_only"):
            return self._load_resharded(path, state, saved, now)
        root, tag = os.path.split(os.path.normpath(path))
        load_path, _ = self.engine.ds.load_checkpoint(
            root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
            load_module_strict=True,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        rng_pt = os.path.join(path, "megalm", f"rng_rank{self.rank:05d}.pt")
        if state["world_size"] == self.world_size and os.path.exists(rng_pt):
            tensors = torch.load(rng_pt, weights_only=True)
            with open(os.path.join(path, "megalm", f"rng_rank{self.rank:05d}.json")) as f:
                _set_rng_state(tensors, json.load(f))
        elif self.rank == 0:
            logger.warning(f"world size changed ({state['world_size']} -> {self.world_size}): RNG states not restored")
        self.consumed_samples = state["consumed_samples"]
        if self.rank == 0:
            logger.info(f"resumed from {path} at step {state['step']} ({self.consumed_samples} samples consumed)")
        return state["step"], state["consumed_samples"]

    def _load_resharded(self, path: str, state: dict, saved: tuple, now: tuple) -> tuple[int, int]:
        """Another layout (tensor, pipeline, world, ZeRO): load through the layout-independent shards."""
        from megalm.training import universal

        carried = universal.load_into_engine(self.engine, self.cfg, path)
        step, consumed = int(state["step"]), int(state["consumed_samples"])
        ds = self.engine.ds
        ds.global_steps = step
        ds.global_samples = consumed
        sched = getattr(ds, "lr_scheduler", None)
        if sched is not None and step > 0:
            sched.last_epoch = step - 1
            sched.step()
        self.consumed_samples = consumed
        if self.rank == 0:
            names = ("tensor", "pipeline", "world", "zero")
            change = ", ".join(f"{n} {a}->{b}" for n, a, b in zip(names, saved, now) if a != b) or "imported weights"
            logger.warning(f"resharded {path} ({change}) at step {step}; optimizer state "
                           f"{'carried over' if carried else 'NOT carried over (fresh Adam moments)'}")
        return step, consumed
