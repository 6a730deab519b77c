"""preprocess against a reference written from the spec: sp.encode(text) + eos per document, MMIDIDX bytes."""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megalm.data.clean import CleanOptions
from megalm.data.indexed import IndexedDataset
from megalm.data.preprocess import Options, main, preprocess
from megalm.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reference_bytes(sequences_per_doc, dtype=np.uint16):
    """(.bin, .idx) bytes for documents given as lists of token sequences, straight from the format spec."""
    lengths, docs = [], [0]
    bin_ = b""
    for doc in sequences_per_doc:
        for s in doc:
            bin_ += np.array(s, dtype).tobytes()
            lengths.append(len(s))
        docs.append(len(lengths))
    ptr, p = [], 0
    for n in lengths:
        ptr.append(p)
        p += n * np.dtype(dtype).itemsize
    code = {np.uint16: 8, np.int32: 4}[dtype]
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(lengths), len(docs))
           + struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(ptr)}q", *ptr)
           + struct.pack(f"<{len(docs)}q", *docs))
    return bin_, idx


def megatron_reference(texts, sp, append_eod=True):
    """Megatron's encode: drop zero-token sentences; eos after a non-empty document."""
    docs = []
    for t in texts:
        sents = t if isinstance(t, list) else [t]
        seqs = [ids for ids in (sp.encode(s, out_type=int) for s in sents) if ids]
        if seqs and append_eod:
            seqs[-1] = seqs[-1] + [sp.eos_id()]
        docs.append(seqs)
    return docs


def read(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_byte_identical_to_megatron_reference(tmp_path, corpus_path, corpus_texts, tokenizer, workers):
    out = str(tmp_path / "out")
    s = preprocess([corpus_path], out, tokenizer.model_path, Options(append_eod=True), workers=workers,
                   chunk_bytes=40_000, progress=False)
    assert s.outputs == {"text": out + "_text_document"}
    assert read(out + "_text_document") == reference_bytes(megatron_reference(corpus_texts, tokenizer.sp))
    assert s.documents == len(corpus_texts) and not s.dropped


def test_no_eod_and_int32_for_big_vocab(tmp_path, corpus_texts, tokenizer, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:10]))
    out = str(tmp_path / "o")
    preprocess([str(src)], out, tokenizer.model_path, Options(append_eod=False), workers=0, progress=False)
    assert read(out + "_text_document") == reference_bytes(megatron_reference(corpus_texts[:10], tokenizer.sp, False))
    import megalm.data.tokenizer as T

    orig = T.Tokenizer.__init__

    def big(self, path):
        orig(self, path)
        self.vocab_size = 70000

    monkeypatch.setattr(T.Tokenizer, "__init__", big)
    preprocess([str(src)], out, tokenizer.model_path, Options(append_eod=True), workers=0, progress=False)
    assert IndexedDataset(out + "_text_document").dtype == np.int32
    assert read(out + "_text_document") == reference_bytes(megatron_reference(corpus_texts[:10], tokenizer.sp), np.int32)


def test_gzip_glob_multiple_inputs_in_order(tmp_path, corpus_texts, tokenizer):
    a, b = corpus_texts[:30], corpus_texts[30:60]
    d = tmp_path / "in"
    d.mkdir()
    (d / "part1.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in a))
    with gzip.open(d / "part2.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in b))
    out = str(tmp_path / "o")
    preprocess([str(d / "part*")], out, tokenizer.model_path, Options(append_eod=True), workers=2,
               chunk_bytes=10_000, progress=False)
    assert read(out + "_text_document") == reference_bytes(megatron_reference(a + b, tokenizer.sp))


def test_multiple_keys_and_presplit_lists(tmp_path, tokenizer):
    rows = [{"text": "Hello world.", "title": "First"}, {"text": ["One sentence.", "", "Two."], "title": ""}]
    src = tmp_path / "k.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "o")
    s = preprocess([str(src)], out, tokenizer.model_path, Options(json_keys=("text", "title"), append_eod=True),
                   workers=0, progress=False)
    assert set(s.outputs) == {"text", "title"}
    assert read(out + "_text_document") == reference_bytes(megatron_reference([r["text"] for r in rows], tokenizer.sp))
    assert read(out + "_title_document") == reference_bytes(
        megatron_reference([r["title"] for r in rows], tokenizer.sp))


BAD_LINES = [
    (b'{"text": "fine one"}', None),
    (b'{"text": "broken', "malformed_json"),
    (b'{"other": "no text key"}', "missing_key"),
    (b'{"text": 42}', "non_string"),
    (b'{"text": "bad \xff\xfe bytes"}', "invalid_utf8"),
    (b'{"text": ""}', "empty"),
    (b'["a", "list"]', "not_an_object"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_unicode"),
    (b'', None),  # blank line: skipped, not an error
    (b'{"text": "fine two"}', None),
]


def _write_bad(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    return str(src)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_lines_are_skipped_counted_and_reported(tmp_path, tokenizer, workers, caplog):
    src = _write_bad(tmp_path)
    out = str(tmp_path / "o")
    s = preprocess([src], out, tokenizer.model_path, Options(append_eod=True), workers=workers, progress=False)
    expected = {r: 1 for _, r in BAD_LINES if r}
    assert dict(s.dropped) == expected
    by_reason = {reason: (path, line) for path, line, reason, _ in s.examples}
    for lineno, (_, reason) in enumerate(BAD_LINES, start=1):
        if reason:
            assert by_reason[reason] == (src, lineno)
    assert s.blank_lines == 1
    # everything valid is written; the empty document keeps Megatron's zero-length document entry
    ds = IndexedDataset(out + "_text_document")
    sp = tokenizer.sp
    assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode("fine one") + [3], sp.encode("fine two") + [3]]
    assert ds.document_indices.tolist() == [0, 1, 1, 2]
    assert f"{os.path.basename(src)}:3" in caplog.text  # the missing key line is logged with file:line


def test_drop_empty_removes_the_document_entry(tmp_path, tokenizer):
    src = _write_bad(tmp_path)
    out = str(tmp_path / "o")
    preprocess([src], out, tokenizer.model_path, Options(append_eod=True, drop_empty=True), workers=0,
               progress=False)
    assert IndexedDataset(out + "_text_document").document_indices.tolist() == [0, 1, 2]


def test_strict_stops_and_leaves_previous_output(tmp_path, tokenizer, corpus_path):
    out = str(tmp_path / "o")
    preprocess([corpus_path], out, tokenizer.model_path, Options(append_eod=True), workers=0, progress=False)
    before = read(out + "_text_document")
    src = _write_bad(tmp_path)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        preprocess([src], out, tokenizer.model_path, Options(append_eod=True), workers=2, strict=True,
                   progress=False)
    assert read(out + "_text_document") == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_cli_and_thin_script(tmp_path, tokenizer):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "a b c"}\n{"text": "d e"}\n')
    out = str(tmp_path / "o")
    assert main(["--input", str(src), "--output-prefix", out, "--tokenizer-model", tokenizer.model_path,
                 "--append-eod", "--workers", "1", "--no-progress"]) == 0
    assert len(IndexedDataset(out + "_text_document")) == 2
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess.py"), "--input", str(tmp_path / "no"),
                        "--output-prefix", out, "--tokenizer-model", tokenizer.model_path, "--workers", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "input file not found" in r.stderr and "Traceback" not in r.stderr


def test_split_sentences(tmp_path, tokenizer):
    rows = ["First one. Second one here! Third?", "Only sentence", ""]
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = str(tmp_path / "o")
    s = preprocess([str(src)], out, tokenizer.model_path, Options(append_eod=True, split_sentences=True),
                   workers=0, progress=False)
    assert s.outputs["text"] == out + "_text_sentence"
    ds = IndexedDataset(out + "_text_sentence")
    sp = tokenizer.sp
    expect = megatron_reference([["First one.", "Second one here!", "Third?"], ["Only sentence"], []], sp)
    assert read(out + "_text_sentence") == reference_bytes(expect)
    assert ds.document_indices.tolist() == [0, 3, 4, 4]


def test_cleaning_filters_and_dedup(tmp_path, tokenizer):
    rows = ["ﬁne\u00a0text\x07 here  ", "tiny", "x" * 500, "ﬁne\u00a0text\x07 here  ", "another  doc\r\n\n\n\nend"]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = str(tmp_path / "o")
    clean = CleanOptions(normalize="nfkc", strip_control=True, clean_whitespace=True, min_chars=5, max_chars=100,
                         dedup=True)
    s = preprocess([str(src)], out, tokenizer.model_path, Options(append_eod=True, clean=clean), workers=2,
                   progress=False)
    assert dict(s.dropped) == {"too_short": 1, "too_long": 1, "duplicate": 1}
    ds = IndexedDataset(out + "_text_document")
    texts = [tokenizer.decode(ds[i][:-1]) for i in range(len(ds))]
    assert texts == ["fine text here", "another doc\n\nend"]


def test_progress_bar_on_a_terminal():
    import io

    from megalm.data.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = Progress(total_bytes=1000, stream=out)
    p.update(docs=10, raw_bytes=500, pos_bytes=500, force=True)
    p.close()
    text = out.getvalue()
    assert "50.0%" in text and "docs/s" in text and "MB/s" in text and "ETA" in text and text.startswith("\r[")
