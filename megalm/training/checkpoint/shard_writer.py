"""A safetensors file written tensor by tensor, hashed while it is written, fsynced at the end.

``safetensors.torch.save_file`` needs every tensor in memory at once and a second
read to hash the result; a checkpoint shard of a large model needs neither. The
header (names, dtypes, shapes, offsets) is known before any value is, so it goes
first and each tensor's bytes follow as soon as they exist. The files are
ordinary safetensors: ``safetensors.safe_open`` reads them.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from megalm.training.checkpoint import checksum

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_CHUNK = 64 << 20  # bytes per write (and hash update) of a large tensor


def _libc_sync_file_range():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _libc_sync_file_range()


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask Linux to start writing these bytes to disk now (SYNC_FILE_RANGE_WRITE, non-blocking), so the final
    fsync finds little left and the disk works while the next tensor is hashed. A no-op where unsupported."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, 2)


def _nbytes(dtype: torch.dtype, shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


class ShardWriter:
    """Write ``entries`` (name, dtype, shape) in order; ``close`` returns (size, checksum) of the file.

    Hashing (``checksum.ALGORITHM``) runs on a helper thread (the hashers release the GIL), overlapping the writes; each large chunk's
    writeback to disk starts as soon as it is written.
    """

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, tuple]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = path
        header: dict = {"__metadata__": dict(metadata or {})}
        offset = 0
        self._expected = []
        for name, dtype, shape in entries:
            n = _nbytes(dtype, shape)
            header[name] = {"dtype": _DTYPES[dtype], "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + n]}
            self._expected.append((name, dtype, tuple(int(d) for d in shape), n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._sha = checksum.new()
        self._hasher = ThreadPoolExecutor(max_workers=1)  # one worker: updates stay in order
        self._pending = []
        self._f = open(path, "wb")
        self._next = 0
        self._size = 0
        self._emit(struct.pack("<Q", len(raw)) + raw)

    def _emit(self, data) -> None:
        self._f.write(data)
        if len(data) >= _CHUNK // 2:
            self._f.flush()
            _start_writeback(self._f.fileno(), self._size, len(data))
        self._size += len(data)
        self._pending.append(self._hasher.submit(self._sha.update, data))
        if len(self._pending) > 4:  # keep at most a few chunks referenced
            self._pending.pop(0).result()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape, n = self._expected[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {want} {dtype} {shape}, got {name} {tensor.dtype} "
                             f"{tuple(tensor.shape)} (a megalm bug)")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        for start in range(0, n, _CHUNK):
            self._emit(memoryview(flat[start:start + _CHUNK]))
        self._next += 1

    def close(self) -> tuple[int, str]:
        if self._next != len(self._expected):
            raise ValueError(f"{self.path}: {len(self._expected) - self._next} tensors were never written")
        for fut in self._pending:
            fut.result()
        self._hasher.shutdown()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._size, self._sha.hexdigest()

    def abort(self) -> None:
        self._hasher.shutdown(wait=True)
        self._f.close()


def write_hashed(path: str, data: bytes) -> tuple[int, str]:
    """A small file (JSON, a tokenizer copy) written, fsynced and hashed (``checksum.ALGORITHM``) from memory."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data), checksum.of_bytes(data)
