"""Index caches (.npy): built once, written atomically, memory-mapped by every rank.

With torch.distributed up, global rank 0 builds first; ranks that still miss
the files afterwards (a node without the shared filesystem) build their own
copy, one writer per node; a rank that can't see any copy builds in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import uuid
from typing import Callable, Optional

import numpy as np

from megalm import environment
from megalm.errors import DataError

log = logging.getLogger(__name__)


def description_hash(description: dict) -> tuple[str, str]:
    text = json.dumps(description, indent=4, sort_keys=False, default=str)
    return text, hashlib.md5(text.encode("utf-8")).hexdigest()


def save_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}.npy"
    try:
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _dist():
    """torch.distributed when a process group is up, else None (never imports torch itself)."""
    d = sys.modules.get("torch.distributed")
    if d is not None and d.is_available() and d.is_initialized():
        return d
    return None


def _load(paths: dict[str, str]) -> Optional[dict[str, np.ndarray]]:
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    try:
        return {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
    except (ValueError, OSError) as e:  # a torn or foreign file: rebuild rather than fail
        log.warning("index cache %s unreadable (%s); rebuilding", next(iter(paths.values())), e)
        return None


def cached_arrays(
    cache_dir: Optional[str],
    base: str,
    description: dict,
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Arrays named by ``build()``'s keys, cached as ``{cache_dir}/{md5}-{base}-{key}.npy``.

    ``description`` identifies the build (its md5 names the files); every rank
    must call this collectively when torch.distributed is initialised.
    """
    text, md5 = description_hash(description)
    if not cache_dir:
        return build()
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        log.warning("index cache dir %s unusable (%s); building in memory", cache_dir, e)
    stem = os.path.join(cache_dir, f"{md5}-{base}")
    desc_path = f"{stem}-description.txt"

    def paths_for(keys) -> dict[str, str]:
        return {k: f"{stem}-{k}.npy" for k in keys}

    def keys_on_disk() -> Optional[list[str]]:
        if not os.path.isfile(desc_path):
            return None
        try:
            with open(desc_path) as f:
                first = f.readline()
            return json.loads(first)["arrays"]
        except (ValueError, KeyError, OSError):
            return None

    def try_load() -> Optional[dict[str, np.ndarray]]:
        keys = keys_on_disk()
        return _load(paths_for(keys)) if keys else None

    def build_and_save() -> dict[str, np.ndarray]:
        arrays = build()
        try:
            for k, p in paths_for(arrays).items():
                save_atomic(p, arrays[k])
            # the description goes last: its presence means every array is complete
            write_text_atomic(desc_path, json.dumps({"arrays": list(arrays)}) + "\n" + text + "\n")
        except OSError as e:  # read-only or full filesystem: train on, just without a cache
            log.warning("could not write index cache %s-* (%s); using the indices from memory", stem, e)
            return arrays
        log.info("built index cache %s-* (%s)", stem, ", ".join(arrays))
        # hand out the mapped files, like every other rank gets: page cache instead of private copies
        return _load(paths_for(arrays)) or arrays

    dist = _dist()
    if dist is None:
        return try_load() or build_and_save()
    from megalm.parallel import comm  # torch is loaded already: a process group is up

    rank = dist.get_rank()
    # rank 0 builds; its outcome (not a bare barrier) is broadcast, so a failed build ends every rank now
    # with rank 0's error instead of leaving them in a collective until the process-group timeout
    status: list = [None]
    error: Optional[BaseException] = None
    if rank == 0 and try_load() is None:
        try:
            build_and_save()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
            status[0] = f"{type(e).__name__}: {e}"
    status[0] = comm.all_gather_object(status[0])[0]  # rank 0's outcome, on the group's device
    if error is not None:
        raise error
    if status[0] is not None:
        raise DataError(f"rank 0 failed to build the index cache {stem}-* ({status[0]}); see rank 0's log")
    local_rank = environment.local_rank()
    if rank != 0 and local_rank == 0 and try_load() is None:
        build_and_save()  # this node does not share rank 0's filesystem
    comm.barrier()
    arrays = try_load()
    if arrays is None:
        log.warning("index cache %s not visible on rank %d; building in memory", stem, rank)
        arrays = build()
    return arrays
