"""A checkpoint directory's MANIFEST.json: verification, and the atomic publish that ends with ``latest``.

A step is written into ``<root>/.tmp-step_N``; each rank hashes the files it wrote
while writing them and reports (size, checksum); rank 0 writes MANIFEST.json from
those reports, renames the directory to ``<root>/step_N`` and only then replaces
``<root>/latest``. Readers check the files they read against the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Callable, Iterable, Optional

import megalm
from megalm.errors import CheckpointError
from megalm.training.checkpoint import checksum
from megalm.training.checkpoint.paths import MANIFEST, STATE_FILE, latest_path_or_none
from megalm.training.checkpoint.shard_writer import write_hashed

logger = logging.getLogger(__name__)

VERIFY_MODES = ("full", "size", "none")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _matches(full: str, meta: dict) -> bool:
    """Whether the file hashes to the checksum its manifest entry names."""
    algorithm = checksum.algorithm_of(meta)
    return checksum.of_file(full, algorithm) == meta[algorithm]


def _mismatch(full: str, meta: dict) -> str:
    name = checksum.display(checksum.algorithm_of(meta))
    return f"{full} does not match its checksum ({name}) in {MANIFEST} (modified or corrupt)"


def _all_files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(r for r in out if r != MANIFEST)


def read_manifest(path: str) -> dict[str, dict]:
    """The manifest's file table, refused when an entry escapes ``path`` or lists nothing over a non-empty dir."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete (a save was interrupted?)")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise KeyError("files")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is corrupt: {e}") from None
    for rel, meta in files.items():
        parts = rel.replace("\\", "/").split("/")
        if os.path.isabs(rel) or ".." in parts or not rel:
            raise CheckpointError(f"{manifest_path} lists {rel!r}, a path outside the checkpoint directory: "
                                  f"refusing it (a checkpoint only names files inside itself)")
        if not isinstance(meta, dict) or "size" not in meta or not checksum.algorithm_of(meta):
            raise CheckpointError(f"{manifest_path}: entry {rel!r} lacks its size or a checksum (one of "
                                  f"{', '.join(checksum.KNOWN)})")
    if not files and _all_files(path):
        raise CheckpointError(f"{manifest_path} lists no files but {path} holds some: refusing an unverifiable "
                              f"checkpoint")
    return files


def verify(path: str, checksums: bool = True, only: Optional[Iterable[str]] = None, mode: str = "") -> None:
    """Raise CheckpointError naming every missing, truncated or altered file of a checkpoint.

    ``only`` limits the check to those relative paths (the files a rank reads); ``mode`` is
    ``checkpoint.verify`` (full: size + checksum, size: size only, none: the manifest's shape only).
    """
    mode = mode or ("full" if checksums else "size")
    files = read_manifest(path)
    if mode == "none":
        return
    wanted = files if only is None else {r: files.get(r) for r in only}
    problems = []
    for rel, meta in wanted.items():
        full = os.path.join(path, rel)
        if meta is None:
            problems.append(f"{full} is not listed in {MANIFEST}")
        elif not os.path.exists(full):
            problems.append(f"missing {full}")
        elif os.path.getsize(full) != meta["size"]:
            problems.append(f"{full} has {os.path.getsize(full)} bytes, expected {meta['size']} (truncated?)")
        elif mode == "full" and not _matches(full, meta):
            problems.append(_mismatch(full, meta))
    if problems:
        raise CheckpointError(f"checkpoint {path} failed verification:\n  " + "\n  ".join(problems))


def check_hashes_in_background(path: str, only: Iterable[str]) -> Callable[[], None]:
    """Hash ``only`` on a helper thread (the hashers release the GIL) while the caller reads them; the returned
    function waits and raises CheckpointError naming any file whose checksum differs from the manifest.
    Check sizes first (``verify(mode="size")``), so nothing truncated is ever parsed."""
    from concurrent.futures import ThreadPoolExecutor

    rels = sorted(set(only))
    files = read_manifest(path)
    pool = ThreadPoolExecutor(max_workers=1)
    futures = {rel: pool.submit(_matches, os.path.join(path, rel), files[rel]) for rel in rels}

    def wait() -> None:
        bad = [rel for rel, fut in futures.items() if not fut.result()]
        pool.shutdown()
        if bad:
            raise CheckpointError(f"checkpoint {path} failed verification:\n  " + "\n  ".join(
                _mismatch(os.path.join(path, rel), files[rel]) for rel in bad))

    return wait


def write_manifest(path: str, reports: dict[str, dict]) -> None:
    """MANIFEST.json from the writers' (size, checksum) reports; files nobody reported are hashed here."""
    entries = dict(reports)
    for rel in _all_files(path):
        if rel not in entries:
            full = os.path.join(path, rel)
            with open(full, "rb") as f:
                os.fsync(f.fileno())
            entries[rel] = checksum.entry(os.path.getsize(full), checksum.of_file(full))
    missing = [r for r in entries if not os.path.exists(os.path.join(path, r))]
    if missing:
        raise CheckpointError(f"{path}: reported files were not found: {missing[:5]} (a megalm bug)")
    entries = {r: checksum.entry(m["size"], m[checksum.algorithm_of(m)], checksum.algorithm_of(m))
               for r, m in sorted(entries.items())}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    write_hashed(tmp, json.dumps({"megalm_version": megalm.__version__, "files": entries}, indent=1).encode())
    os.replace(tmp, os.path.join(path, MANIFEST))
    for d, _, _ in os.walk(path):
        fsync_dir(d)


def write_pointer(root: str, name: str) -> None:
    """Point ``root/latest`` at ``name`` atomically (``name`` exists already)."""
    pointer_tmp = os.path.join(root, ".latest.tmp")
    write_hashed(pointer_tmp, (name + "\n").encode())
    os.replace(pointer_tmp, os.path.join(root, "latest"))
    fsync_dir(root)


def publish(root: str, tmp: str, name: str, state: dict, tokenizer_path: Optional[str] = None,
            update_latest: bool = True, reports: Optional[dict[str, dict]] = None) -> str:
    """Finish a checkpoint written into ``tmp``: megalm state, tokenizer copy, fsynced MANIFEST, then the
    rename to ``root/name`` and, last, the atomic ``latest`` pointer. Returns the final path."""
    final = os.path.join(root, name)
    reports = dict(reports or {})
    os.makedirs(os.path.join(tmp, "megalm"), exist_ok=True)
    size, digest = write_hashed(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1).encode())
    reports[STATE_FILE] = checksum.entry(size, digest)
    if tokenizer_path and os.path.exists(tokenizer_path):
        from megalm.data.tokenizer import copy_tokenizer

        # tokenizer.model | tokenizer.json | vocab + merges; small, hashed with the manifest below
        copy_tokenizer(tokenizer_path, os.path.join(tmp, "megalm"))
    write_manifest(tmp, reports)
    if os.path.exists(final):  # a re-save of the same step (e.g. after a resume from an older one)
        if update_latest and latest_path_or_none(root) == final:
            # ``latest`` names it: swap the two directories in one step so it never names a missing one
            _exchange(tmp, final)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(final)
            os.rename(tmp, final)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    if update_latest:
        write_pointer(root, name)
    return final


def _exchange(a: str, b: str) -> None:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise CheckpointError(f"could not swap {a} and {b} atomically: {os.strerror(err)}; remove {b} by hand "
                              f"after checking {a} is complete")
