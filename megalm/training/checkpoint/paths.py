"""Where everything lives in a checkpoint root: step directories, ``latest``, the state file, shard folders.

The one definition of every name on disk; the writers, readers and tools all use these.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from megalm.errors import CheckpointError

STEP_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "MANIFEST.json"
STATE = "megalm_state.json"
STATE_FILE = os.path.join("megalm", STATE)
WEIGHTS_DIR = os.path.join("megalm", "weights")
OPTIM_DIR = os.path.join("megalm", "optim")
RNG_DIR = os.path.join("megalm", "rng")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(rank: int) -> str:
    return os.path.join(RNG_DIR, f"rank{rank:05d}.safetensors")


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
    if not STEP_RE.match(name) or not os.path.isdir(path):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory in {root}")
    return path


def latest_path_or_none(root: str) -> Optional[str]:
    try:
        return latest_path(root)
    except CheckpointError:
        return None


def resolve_step_dir(path: str, step: Optional[int] = None) -> str:
    """A checkpoint root (following ``latest``, or ``step``) or a step directory -> the step directory."""
    if os.path.exists(os.path.join(path, STATE_FILE)):
        return path
    if step is not None:
        candidate = os.path.join(path, step_name(step))
        if not os.path.isdir(candidate):
            raise CheckpointError(f"{path} has no checkpoint for step {step}")
        return candidate
    latest = latest_path(path) if os.path.isdir(path) else None
    if latest is None:
        raise CheckpointError(f"{path} is neither a megalm checkpoint step directory nor a root with a 'latest' file")
    return latest


def read_state(step_dir: str) -> dict:
    """The checkpoint's megalm_state.json (counters, layout, config, tensor index)."""
    from megalm.jsonfile import read_json

    return read_json(os.path.join(step_dir, STATE_FILE), CheckpointError, "not a megalm checkpoint")
