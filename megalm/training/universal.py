"""Reading the layout-free training state of a checkpoint, into any layout or into an export.

Checkpoints hold safetensors shards (see megalm.training.state_save) and JSON:
``megalm/weights/*.safetensors`` (fp32 masters keyed by ``build_model`` names,
TP shards with their partition dim), ``megalm/optim/*.safetensors`` (Adam
moments) and ``megalm/megalm_state.json`` (counters, layout, config, and an index
of which file holds each tensor piece). Any TP x PP x DP x ZeRO layout - the same
one included - or an HF export takes what it needs, tensor by tensor. Only
safetensors and JSON are read: no pickle.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Optional

import torch

from megalm.config import Config, from_dict
from megalm.errors import CheckpointError
from megalm.training import checksum
from megalm.training.manifest import STATE_FILE, check_hashes_in_background, verify
from megalm.training.param_names import model_param_names
from megalm.training.state_save import OPTIM_DIR, WEIGHTS_DIR, rng_file

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------ read

def resolve_step_dir(path: str, step: Optional[int] = None) -> str:
    """A checkpoint root (following ``latest``, or ``step``) or a step directory -> the step directory."""
    from megalm.training.manifest import latest_path, step_name

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
    from megalm.jsonfile import read_json

    return read_json(os.path.join(step_dir, STATE_FILE), CheckpointError, "not a megalm checkpoint")


def _index_from_headers(step_dir: str) -> dict[str, dict]:
    """The tensor index of a checkpoint written without one (HF imports, older saves): from file headers."""
    from safetensors import safe_open

    index: dict[str, dict] = {"weights": {}, "optim": {}}
    for kind, folder in (("weights", WEIGHTS_DIR), ("optim", OPTIM_DIR)):
        for path in sorted(glob.glob(os.path.join(step_dir, folder, "tp*-pp*.safetensors"))):
            rel = os.path.relpath(path, step_dir)
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("megalm", "{}"))
                for key in f.keys():
                    part = meta.get("params", {}).get(key.split("/", 1)[0], {"dim": None, "partitions": None})
                    entry = index[kind].setdefault(key, {"partition": part, "pieces": {}})
                    entry["pieces"][str(meta.get("tensor_rank", 0))] = rel
    if not index["weights"]:
        raise CheckpointError(f"{os.path.join(step_dir, WEIGHTS_DIR)} holds no tpTT-ppPP*.safetensors files")
    return index


def tensor_index(step_dir: str, state: dict) -> dict[str, dict]:
    return state.get("tensor_index") or _index_from_headers(step_dir)


class ShardReader:
    """Tensors of one checkpoint read lazily, one at a time, from the files the index names."""

    def __init__(self, step_dir: str, entries: dict[str, dict]):
        self.step_dir, self.entries = step_dir, entries
        self._open: dict[str, Any] = {}

    def _get(self, rel: str, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if rel not in self._open:
            self._open[rel] = safe_open(os.path.join(self.step_dir, rel), framework="pt")
        return self._open[rel].get_tensor(key)

    def _entry(self, key: str) -> dict:
        if key not in self.entries:
            raise CheckpointError(f"{self.step_dir} holds no tensor {key!r}")
        return self.entries[key]

    def files_for(self, key: str, tensor_rank: int, tensor_size: int) -> set[str]:
        e = self._entry(key)
        pieces = e["pieces"]
        if e["partition"]["dim"] is None:
            return {pieces[min(pieces, key=int)]}
        if len(pieces) == tensor_size:
            return {pieces[str(tensor_rank)]}
        return set(pieces.values())

    def full(self, key: str) -> torch.Tensor:
        """The whole tensor (TP pieces joined)."""
        from megalm.parallel.layers import unshard

        e = self._entry(key)
        pieces = e["pieces"]
        if e["partition"]["dim"] is None:
            return self._get(pieces[min(pieces, key=int)], key)
        shards = [self._get(pieces[r], key) for r in sorted(pieces, key=int)]
        return unshard(shards, e["partition"]["dim"], e["partition"]["partitions"])

    def for_rank(self, key: str, tensor_rank: int, tensor_size: int) -> torch.Tensor:
        """This tensor rank's piece: read directly when the TP degree is unchanged, else cut from the whole."""
        from megalm.parallel.layers import shard

        e = self._entry(key)
        part = e["partition"]
        if part["dim"] is None:
            return self.full(key)
        if len(e["pieces"]) == tensor_size:
            return self._get(e["pieces"][str(tensor_rank)], key)
        return shard(self.full(key), part["dim"], part["partitions"], tensor_rank, tensor_size)

    def close(self) -> None:
        self._open.clear()


def read_full_weights(path: str, step: Optional[int] = None, verify_mode: str = "full"
                      ) -> tuple[Config, int, dict[str, torch.Tensor]]:
    """(config, true vocab size, full fp32 weights keyed by build_model names) of a checkpoint, verified."""
    step_dir = resolve_step_dir(path, step)
    verify(step_dir, only=[STATE_FILE], mode=verify_mode)
    state = read_state(step_dir)
    cfg = from_dict(state["config"], f" (in {step_dir})")
    entries = tensor_index(step_dir, state)["weights"]
    reader = ShardReader(step_dir, entries)
    files = set().union(*(set(e["pieces"].values()) for e in entries.values()))
    verify(step_dir, only=sorted(files), mode=verify_mode)
    weights = {key: reader.full(key) for key in entries}
    return cfg, int(cfg.model.vocab_size), weights


# ------------------------------------------------------------------ load into a layout

def load_into_engine(engine: Any, cfg: Config, step_dir: str, state: dict, verify_mode: str = "full",
                     rng_rank: Optional[int] = None) -> bool:
    """Set this rank's parameters, fp32 masters and Adam moments (and RNG, when ``rng_rank`` is given) from a
    checkpoint of any layout. Each rank verifies only the files it reads. Returns True when the optimizer
    state was carried over."""
    from megalm.parallel import state as pstate
    from megalm.training import ds_state
    from megalm.training.state_save import set_rng_state

    ds = engine.ds
    index = tensor_index(step_dir, state)
    weights = ShardReader(step_dir, index["weights"])
    moments = ShardReader(step_dir, index["optim"]) if index.get("optim") else None
    params = model_param_names(engine, cfg, replicated=True)
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
    rng_rel = rng_file(rng_rank) if rng_rank is not None else None
    if rng_rel is not None:
        files.add(rng_rel)
    # Sizes now; checksums on a helper thread while the tensors are read, checked before the run goes on.
    # A file several ranks read is hashed by one of them: the job hashes each file once, not once per reader.
    if verify_mode == "full":
        verify(step_dir, only=sorted(files), mode="size")
        hashes_ok = _shared_hash_check(step_dir, files)
    else:
        verify(step_dir, only=sorted(files), mode=verify_mode)
        hashes_ok = None

    from safetensors import SafetensorError

    adam_step = int(state.get("adam_step", 0))
    if moments is not None:
        ds_state.ensure_adam_state(ds, adam_step)
    try:
        with torch.no_grad():
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
        if rng_rel is not None:
            from safetensors import safe_open

            with safe_open(os.path.join(step_dir, rng_rel), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                set_rng_state(tensors, json.loads(f.metadata()["plain"]))
    except (CheckpointError, SafetensorError, ValueError) as e:
        if hashes_ok is not None:
            hashes_ok()  # a corrupt file is named as such, not as whatever the parser tripped over
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{step_dir} could not be read: {e}") from e
    if hashes_ok is not None:
        hashes_ok()
    return moments is not None


def _shared_hash_check(step_dir: str, files: set[str]):
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


def write_checkpoint(root: str, cfg: Config, vocab_size: int, weights: dict[str, torch.Tensor],
                     tokenizer_path: Optional[str] = None, step: int = 0) -> str:
    """A complete megalm checkpoint from full weights (no optimizer state), e.g. an HF import.

    megalm/pretrain.py resumes from it at whatever layout it runs (see Checkpointer.load).
    """
    import dataclasses
    import shutil

    import megalm
    from megalm.model.tp_layout import tp_rule
    from megalm.training.manifest import publish, step_name
    from megalm.training.shard_writer import ShardWriter

    cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    name = step_name(step)
    tmp = os.path.join(root, ".tmp-" + name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, WEIGHTS_DIR))
    rel = os.path.join(WEIGHTS_DIR, "tp00-pp00.safetensors")
    # The file holds each tensor whole (one piece, tensor rank 0), but its partition must still be the one the
    # model splits it by: the loader cuts each TP rank's slice from that, and "dim": None would mean replicated
    # (every rank loads the whole tensor). Name rules, as in the HF mapping; names they do not know are replicated.
    parts = {}
    for n in weights:
        rule = tp_rule(n, cfg, vocab_size)
        parts[n] = {"dim": int(rule[0]), "partitions": [int(x) for x in rule[1]]} if rule else \
            {"dim": None, "partitions": None}
    meta = {"tensor_size": 1, "tensor_rank": 0, "pipeline_size": 1, "pipeline_rank": 0, "params": parts}
    w = ShardWriter(os.path.join(tmp, rel), [(n, torch.float32, tuple(t.shape)) for n, t in weights.items()],
                    {"megalm": json.dumps(meta)})
    for n, t in weights.items():
        w.write(n, t.float())
    size, sha = w.close()
    index = {"weights": {n: {"partition": parts[n], "pieces": {"0": rel}} for n in weights}, "optim": {}}
    state = {"step": step, "consumed_samples": 0, "world_size": 1, "tensor": 1, "pipeline": 1,
             "zero_stage": 0, "megalm_version": megalm.__version__, "config": cfg.to_dict(), "universal_only": True,
             "tensor_index": index}
    return publish(root, tmp, name, state, tokenizer_path, reports={rel: checksum.entry(size, sha)})
