"""MMIDIDX reader/writer against a reference written out from the format spec (not from our code)."""

import os
import struct

import numpy as np
import pytest

from megalm.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype, write_dataset
from megalm.errors import DataError

SPEC_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
              np.float64: 6, np.float32: 7, np.uint16: 8}


def reference_write(prefix, docs_of_sequences, dtype, code=None):
    """Straight from the spec: header, int32 lengths, int64 byte pointers, int64 doc indices."""
    dtype = np.dtype(dtype)
    lengths, doc_idx = [], [0]
    with open(prefix + ".bin", "wb") as f:
        for doc in docs_of_sequences:
            for seq in doc:
                f.write(np.array(seq, dtype=dtype).tobytes())
                lengths.append(len(seq))
            doc_idx.append(len(lengths))
    pointers, p = [], 0
    for n in lengths:
        pointers.append(p)
        p += n * dtype.itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code if code is not None else SPEC_CODES[dtype.type]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def random_docs(rng, n_docs, vocab, max_sents=3, max_len=50, empty_every=0):
    docs = []
    for d in range(n_docs):
        if empty_every and d % empty_every == 0:
            docs.append([])
            continue
        docs.append([rng.integers(0, vocab, rng.integers(1, max_len)).tolist()
                     for _ in range(rng.integers(1, max_sents + 1))])
    return docs


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8, np.int64])
def test_writer_is_byte_identical_to_spec(tmp_path, dtype):
    rng = np.random.default_rng(0)
    vocab = 200 if dtype == np.uint8 else 60000
    docs = random_docs(rng, 40, vocab, empty_every=7)
    reference_write(str(tmp_path / "ref"), docs, dtype)
    w = IndexedDatasetWriter(str(tmp_path / "ours"), dtype)
    for i, doc in enumerate(docs):
        if i % 2:
            for seq in doc:
                w.add_sequence(seq)
            w.end_document()
        else:
            flat = [t for s in doc for t in s]
            w.add_document(flat, [len(s) for s in doc])
    w.finalize()
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"ours{ext}", "rb").read() == open(tmp_path / f"ref{ext}", "rb").read()


def test_add_batch_and_small_chunks_match(tmp_path, monkeypatch):
    monkeypatch.setattr(IndexedDatasetWriter, "_CHUNK", 3)  # force many spills to the side files
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 50, 1000)
    reference_write(str(tmp_path / "ref"), docs, np.uint16)
    with IndexedDatasetWriter(str(tmp_path / "ours"), np.uint16) as w:
        for a in range(0, 50, 7):
            batch = docs[a:a + 7]
            seqs = [s for d in batch for s in d]
            w.add_batch(np.concatenate([np.array(s) for s in seqs]), [len(s) for s in seqs], [len(d) for d in batch])
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"ours{ext}", "rb").read() == open(tmp_path / f"ref{ext}", "rb").read()


def test_reader_random_access(tmp_path):
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 30, 50000, empty_every=5)
    reference_write(str(tmp_path / "r"), docs, np.int32)
    ds = IndexedDataset(str(tmp_path / "r"))
    seqs = [s for d in docs for s in d]
    assert len(ds) == len(seqs) and ds.dtype == np.int32 and ds.num_documents == len(docs)
    for i, s in enumerate(seqs):
        assert ds[i].tolist() == s
        if len(s) > 3:
            assert ds.get(i, 1, 2).tolist() == s[1:3]
            assert ds.get(i, 2).tolist() == s[2:]
    assert ds[-1].tolist() == seqs[-1]
    assert [a.tolist() for a in ds[2:5]] == seqs[2:5]
    for d, doc in enumerate(docs):
        assert ds.document(d).tolist() == [t for s in doc for t in s]
    np.testing.assert_array_equal(ds.sequence_lengths, [len(s) for s in seqs])
    with pytest.raises(IndexError):
        ds[len(seqs)]
    with pytest.raises(IndexError):
        ds.get(0, 0, len(seqs[0]) + 1)
    assert not ds[0].flags.writeable


def test_optimal_dtype():
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32


@pytest.mark.parametrize("float_dtype,neox_code", [(np.float32, 6), (np.float64, 7)])
def test_neox_swapped_float_codes(tmp_path, float_dtype, neox_code):
    docs = [[[0.5, 1.5, 2.5]], [[3.25]]]
    reference_write(str(tmp_path / "n"), docs, float_dtype, code=neox_code)
    ds = IndexedDataset(str(tmp_path / "n"))
    assert ds.dtype == float_dtype
    assert ds[0].tolist() == [0.5, 1.5, 2.5] and ds[1].tolist() == [3.25]


@pytest.fixture()
def good(tmp_path):
    prefix = str(tmp_path / "g")
    write_dataset(prefix, [[1, 2, 3], [4, 5], [6]])
    return prefix


def _corrupt(path, offset=None, data=None, truncate=None):
    raw = bytearray(open(path, "rb").read())
    if truncate is not None:
        raw = raw[:truncate]
    if offset is not None:
        raw[offset:offset + len(data)] = data
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("what,kwargs,match", [
    ("idx", dict(offset=0, data=b"XXXX"), "bad magic"),
    ("idx", dict(offset=9, data=struct.pack("<Q", 2)), "version"),
    ("idx", dict(offset=17, data=b"\x09"), "dtype code"),
    ("idx", dict(truncate=20), "truncated header"),
    ("idx", dict(truncate=50), "does not match its header"),
    ("idx", dict(offset=18, data=struct.pack("<Q", 99)), "does not match its header"),
    ("bin", dict(truncate=4), "truncated"),
    ("idx", dict(offset=34 + 12, data=struct.pack("<q", 2)), "pointer|truncated"),  # pointer of seq 0
    ("idx", dict(offset=34 + 12 + 8, data=struct.pack("<q", 4)), "pointer 1"),  # pointer of seq 1
    ("idx", dict(offset=34 + 36 + 24, data=struct.pack("<q", 2)), "last document index"),
])
def test_corrupt_files_raise_naming_the_file(good, what, kwargs, match):
    path = good + "." + what
    _corrupt(path, **kwargs)
    with pytest.raises(DataError, match=match) as e:
        IndexedDataset(good)
    assert os.path.basename(good) in str(e.value)


def test_missing_files(tmp_path, good):
    os.remove(good + ".bin")
    with pytest.raises(DataError, match=r"g\.bin"):
        IndexedDataset(good)
    with pytest.raises(DataError, match="not found"):
        IndexedDataset(str(tmp_path / "none"))


def test_failed_write_leaves_existing_dataset(tmp_path, good):
    before = open(good + ".idx", "rb").read(), open(good + ".bin", "rb").read()
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(good, np.uint16) as w:
            w.add_document([9, 9, 9, 9])
            raise RuntimeError("interrupted")
    assert (open(good + ".idx", "rb").read(), open(good + ".bin", "rb").read()) == before
    assert sorted(os.listdir(tmp_path)) == ["g.bin", "g.idx"]


def test_merge_matches_single_write(tmp_path):
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 20, 1000, empty_every=6)
    reference_write(str(tmp_path / "a"), docs[:8], np.uint16)
    reference_write(str(tmp_path / "b"), docs[8:], np.uint16)
    reference_write(str(tmp_path / "all"), docs, np.uint16)
    with IndexedDatasetWriter(str(tmp_path / "m"), np.uint16) as w:
        w.add_index(str(tmp_path / "a"))
        w.add_index(str(tmp_path / "b"))
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"m{ext}", "rb").read() == open(tmp_path / f"all{ext}", "rb").read()


def test_empty_dataset(tmp_path):
    write_dataset(str(tmp_path / "e"), [])
    ds = IndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.num_documents == 0


def test_merge_tool_matches_single_preprocess(tmp_path, corpus_path, corpus_texts, tokenizer):
    """Shards preprocessed separately and merged == one run over the concatenated input."""
    import json

    from megalm.data.merge import main as merge_main
    from megalm.data.preprocess import Options, preprocess

    parts = [corpus_texts[:40], corpus_texts[40:]]
    for i, texts in enumerate(parts):
        p = tmp_path / f"in{i}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        preprocess([str(p)], str(tmp_path / f"shard{i}"), tokenizer.model_path, Options(append_eod=True),
                   workers=0, progress=False)
    preprocess([corpus_path], str(tmp_path / "whole"), tokenizer.model_path, Options(append_eod=True),
               workers=0, progress=False)
    assert merge_main(["--input", str(tmp_path / "shard*_text_document.idx"),
                       "--output-prefix", str(tmp_path / "merged")]) == 0
    for ext in (".bin", ".idx"):
        assert (open(tmp_path / f"merged{ext}", "rb").read()
                == open(tmp_path / f"whole_text_document{ext}", "rb").read())
    with pytest.raises(DataError, match="no .bin/.idx"):
        merge_main(["--input", str(tmp_path / "nothing*"), "--output-prefix", str(tmp_path / "m2")])
