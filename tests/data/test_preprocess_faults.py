"""Preprocess under faults: a killed worker, pathological lines and corrupt gzip end with a named error or a
counted bad line, never a hang or a traceback."""

import gzip
import os
import signal
import time

import pytest

import megalm.data.preprocess as pp
from megalm.data.indexed import IndexedDataset
from megalm.data.preprocess import Options, preprocess
from megalm.errors import DataError

MARKER = b"KILL-THIS-WORKER"


def _suicidal(task):
    """encode_chunk, except the chunk holding MARKER kills its own worker the way the OOM killer would."""
    if MARKER in task[2]:
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(task)


_real = pp.encode_chunk


def test_killed_worker_ends_the_run_naming_the_lines(tmp_path, tokenizer, monkeypatch):
    src = tmp_path / "in.jsonl"
    lines = [b'{"text": "document number %d"}' % i for i in range(400)]
    lines[250] = b'{"text": "%s"}' % MARKER
    src.write_bytes(b"\n".join(lines) + b"\n")
    monkeypatch.setattr(pp, "encode_chunk", _suicidal)  # workers are forked: they inherit the patch
    out = str(tmp_path / "o")
    t0 = time.time()
    with pytest.raises(DataError) as e:
        preprocess([str(src)], out, tokenizer.model_path, Options(append_eod=True), workers=2, progress=False,
                   chunk_bytes=1 << 12)
    assert time.time() - t0 < 30
    msg = str(e.value)
    assert "SIGKILL" in msg and "in.jsonl" in msg
    first, last = (int(x.replace(",", "")) for x in msg.split(" lines ")[1].split(";")[0].split("-"))
    assert first <= 251 <= last  # the dead worker's chunk holds line 251
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o")]  # .tmp outputs removed


def test_deep_json_non_object_and_memory_error_are_bad_lines(tmp_path, tokenizer, monkeypatch):
    src = tmp_path / "b.jsonl"
    src.write_bytes(b"\n".join([
        b'{"text": "good one"}',
        b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError in json.loads
        b'"just a string"',
        b"42",
        b'{"text": "HUGE"}',
        b'{"text": "good two"}',
    ]) + b"\n")
    real_loads = pp.json.loads

    def loads(s):  # one document too big for memory
        if b"HUGE" in s:
            raise MemoryError
        return real_loads(s)

    monkeypatch.setattr(pp.json, "loads", loads)
    out = str(tmp_path / "o")
    s = preprocess([str(src)], out, tokenizer.model_path, Options(append_eod=True), workers=0, progress=False)
    assert dict(s.dropped) == {"too_deep": 1, "not_an_object": 2, "too_big": 1}
    assert {(line, reason) for _, line, reason, _ in s.examples} == {
        (2, "too_deep"), (3, "not_an_object"), (4, "not_an_object"), (5, "too_big")}
    assert len(IndexedDataset(out + "_text_document")) == 2


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_bad_gzip_names_the_file_and_line(tmp_path, tokenizer, damage):
    blob = gzip.compress(b"".join(b'{"text": "line %d with some words"}\n' % i for i in range(20000)))
    blob = blob[: len(blob) // 2] if damage == "truncated" else blob[:20] + b"\x00" * 64 + blob[84:]
    src = tmp_path / "c.jsonl.gz"
    src.write_bytes(blob)
    with pytest.raises(DataError, match=r"c\.jsonl\.gz: corrupt or truncated gzip data after line [\d,]+"):
        preprocess([str(src)], str(tmp_path / "o"), tokenizer.model_path, Options(append_eod=True), workers=1,
                   progress=False, chunk_bytes=1 << 14)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o")]
