"""Reading the layout-free tensors of a checkpoint, piece by piece or whole, for any layout or an export.

Checkpoints hold safetensors shards (written by write_shards) and JSON:
``megalm/weights/*.safetensors`` (fp32 masters keyed by ``build_model`` names,
TP shards with their partition dim), ``megalm/optim/*.safetensors`` (Adam
moments) and ``megalm/megalm_state.json`` (counters, layout, config, and an index
of which file holds each tensor piece). Only safetensors and JSON are read: no pickle.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional

import torch

from megalm.config import Config, from_dict
from megalm.errors import CheckpointError
from megalm.training.checkpoint.manifest import verify
from megalm.training.checkpoint.paths import OPTIM_DIR, STATE_FILE, WEIGHTS_DIR, read_state, resolve_step_dir


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
