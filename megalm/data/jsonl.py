"""Reading JSONL corpora: plain or gzip files, several paths or globs, line by line with positions.

Shared by preprocess and train-tokenizer so both accept the same inputs and
report bad lines by file and line number.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from typing import BinaryIO, Iterator, Sequence

from megalm.errors import DataError


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Expand globs and directories (their *.jsonl / *.jsonl.gz / *.json) in order, failing on no match."""
    files: list[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(
                p for p in glob.glob(os.path.join(pat, "*"))
                if p.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
            )
        elif any(ch in pat for ch in "*?["):
            found = sorted(glob.glob(pat))
        else:
            if not os.path.isfile(pat):
                raise DataError(f"input file not found: {pat}")
            found = [pat]
        if not found:
            raise DataError(f"input pattern matched no files: {pat}")
        files.extend(found)
    return files


def open_binary(path: str) -> BinaryIO:
    """Open a corpus file for binary line reading; gzip is detected by magic bytes, not the name."""
    f = open(path, "rb")
    head = f.peek(2)[:2] if hasattr(f, "peek") else b""
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return io.BufferedReader(f, buffer_size=1 << 20) if not isinstance(f, io.BufferedReader) else f


def iter_lines(path: str) -> Iterator[bytes]:
    """Raw lines of one file (bytes, newline kept), streamed."""
    with open_binary(path) as f:
        yield from f


def iter_texts(paths: Sequence[str], key: str = "text") -> Iterator[str]:
    """Text values of ``key`` from every valid line; bad lines are skipped silently (for tokenizer training)."""
    import json

    for path in expand_inputs(paths):
        for line in iter_lines(path):
            try:
                value = json.loads(line)[key]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(value, str) and value:
                yield value
            elif isinstance(value, list):
                text = "".join(v for v in value if isinstance(v, str))
                if text:
                    yield text
