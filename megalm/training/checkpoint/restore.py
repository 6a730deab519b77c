"""A checkpoint of any layout into this rank's engine: parameters, fp32 masters, Adam moments, RNG.

Any TP x PP x DP x ZeRO layout - the same one included - takes what it needs,
tensor by tensor. Each rank verifies only the files it reads; a file several ranks
read is hashed by one of them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import torch

from megalm.config import Config
from megalm.errors import CheckpointError
from megalm.training import ds_state
from megalm.training.checkpoint.manifest import check_hashes_in_background, verify
from megalm.training.checkpoint.paths import STATE_FILE, rng_file
from megalm.training.checkpoint.read_shards import ShardReader, tensor_index
from megalm.training.param_names import model_param_names


def load_into_engine(engine: Any, cfg: Config, step_dir: str, state: dict, verify_mode: str = "full",
                     rng_rank: Optional[int] = None) -> bool:
    """Set this rank's parameters, fp32 masters and Adam moments (and RNG, when ``rng_rank`` is given) from a
    checkpoint of any layout. Returns True when the optimizer state was carried over."""
    from safetensors import SafetensorError

    index = tensor_index(step_dir, state)
    weights = ShardReader(step_dir, index["weights"])
    moments = ShardReader(step_dir, index["optim"]) if index.get("optim") else None
    params = model_param_names(engine, cfg, replicated=True)
    rng_rel = rng_file(rng_rank) if rng_rank is not None else None
    files = _files_to_read(step_dir, index, params, weights, moments, rng_rel)
    # Sizes now; checksums on a helper thread while the tensors are read, checked before the run goes on.
    if verify_mode == "full":
        verify(step_dir, only=sorted(files), mode="size")
        hashes_ok = _shared_hash_check(step_dir, files)
    else:
        verify(step_dir, only=sorted(files), mode=verify_mode)
        hashes_ok = None
    if moments is not None:
        ds_state.ensure_adam_state(engine.ds, int(state.get("adam_step", 0)))
    try:
        _set_tensors(engine.ds, step_dir, params, weights, moments)
        if rng_rel is not None:
            _set_rng(step_dir, rng_rel)
    except (CheckpointError, SafetensorError, ValueError) as e:
        if hashes_ok is not None:
            hashes_ok()  # a corrupt file is named as such, not as whatever the parser tripped over
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{step_dir} could not be read: {e}") from e
    if hashes_ok is not None:
        hashes_ok()
    return moments is not None


def _files_to_read(step_dir: str, index: dict, params: dict, weights: ShardReader,
                   moments: Optional[ShardReader], rng_rel: Optional[str]) -> set[str]:
    """The files this rank reads (refusing a checkpoint that lacks a tensor this model has)."""
    from megalm.parallel import state as pstate

    missing = [n for n in params if n not in index["weights"]]
    if missing:
        raise CheckpointError(f"{step_dir} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if moments is not None:
        lacking = [n for n in params if f"{n}/exp_avg" not in index["optim"]]
        if lacking:
            raise CheckpointError(f"{step_dir} lacks Adam moments for {lacking[:5]}")
    tr, ts = pstate.tensor_rank(), pstate.tensor_size()
    files = {STATE_FILE}
    for n in params:
        files |= weights.files_for(n, tr, ts)
        if moments is not None:
            files |= set().union(*(moments.files_for(f"{n}/{k}", tr, ts) for k in ds_state.ADAM_KEYS))
    if rng_rel is not None:
        files.add(rng_rel)
    return files


@torch.no_grad()
def _set_tensors(ds: Any, step_dir: str, params: dict, weights: ShardReader, moments: Optional[ShardReader]) -> None:
    from megalm.parallel import state as pstate

    tr, ts = pstate.tensor_rank(), pstate.tensor_size()
    for name, p in params.items():  # same order on every rank: ZeRO-3 sets are collective
        value = weights.for_rank(name, tr, ts)
        if tuple(value.shape) != ds_state.full_shape(p):
            raise CheckpointError(f"{step_dir}: {name} has shape {tuple(value.shape)}, the model "
                                  f"{ds_state.full_shape(p)} (another model size?)")
        ds_state.set_param(p, value.to(p.device))
        if moments is not None:
            for k in ds_state.ADAM_KEYS:
                ds_state.set_moment(ds, p, k, moments.for_rank(f"{name}/{k}", tr, ts).to(p.device))
    weights.close()


def _set_rng(step_dir: str, rng_rel: str) -> None:
    from safetensors import safe_open

    from megalm.training.checkpoint.rng import set_rng_state

    with safe_open(os.path.join(step_dir, rng_rel), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        set_rng_state(tensors, json.loads(f.metadata()["plain"]))


def _shared_hash_check(step_dir: str, files: set[str]) -> Callable[[], None]:
    """Hash this rank's share of ``files`` (each file by one of the ranks that read it) in the background;
    the returned function (collective) raises on every rank if any rank found a mismatch."""
    import zlib

    import torch.distributed as dist

    from megalm.parallel import comm

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return check_hashes_in_background(step_dir, files)
    everyone = comm.all_gather_object(sorted(files))
    readers: dict[str, list[int]] = {}
    for r, fs in enumerate(everyone):
        for f in fs:
            readers.setdefault(f, []).append(r)
    me = dist.get_rank()
    mine = [f for f, rs in readers.items() if rs[zlib.crc32(f.encode()) % len(rs)] == me]
    local = check_hashes_in_background(step_dir, mine)

    def wait() -> None:
        try:
            local()
            problem = ""
        except CheckpointError as e:
            problem = str(e)
        problems = comm.all_gather_object(problem)
        found = [p for p in problems if p]
        if found:
            raise CheckpointError("\n".join(dict.fromkeys(found)))

    return wait
