"""GPT indices against Megatron's semantics written out as slow reference loops (from the spec)."""

import math
import os

import numpy as np
import pytest

from megalm.data.gpt_dataset import GPTDataset, build_gpt_indices, build_sample_index
from megalm.data.indexed import IndexedDataset, write_dataset


# ---------------------------------------------------------------- the reference (slow, per the spec)

def ref_indices(sizes, indices, num_samples, seq_len, seed):
    tokens_per_epoch = int(sum(int(sizes[i]) for i in indices))
    epochs = 1
    while epochs * tokens_per_epoch < num_samples * seq_len + 1:
        epochs += 1
    separate = False
    sans_final = 0
    if epochs > 1:
        sans_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_len
        per_epoch = (tokens_per_epoch - 1) // seq_len
        separate = (num_samples - sans_final) < int(0.80 * per_epoch)
    rs = np.random.RandomState(seed)

    def doc_index(n_ep):
        a = np.array([d for _ in range(n_ep) for d in indices], dtype=np.int32)
        rs.shuffle(a)
        return a

    if separate:
        doc_idx = np.concatenate([doc_index(epochs - 1), doc_index(1)])
    else:
        doc_idx = doc_index(epochs)
    # sample index: walk the documents, seq_len+1 tokens per sample, consecutive samples share a token
    n_samples = (epochs * tokens_per_epoch - 1) // seq_len
    rows = [(0, 0)]
    pos, off = 0, 0
    while len(rows) <= n_samples:
        remaining = seq_len + 1
        while remaining:
            doc_len = int(sizes[doc_idx[pos]]) - off
            remaining -= doc_len
            if remaining <= 0:
                off += remaining + doc_len - 1
                remaining = 0
            else:
                pos += 1
                off = 0
        rows.append((pos, off))
    sample_idx = np.array(rows)

    def shuffled(lo, hi):
        a = np.arange(lo, hi, dtype=np.uint32)
        rs.shuffle(a)
        return a

    if separate:
        shuf = np.concatenate([shuffled(0, sans_final), shuffled(sans_final, n_samples)])
    else:
        shuf = shuffled(0, n_samples)
    return doc_idx, sample_idx, shuf


def ref_sample(sizes, tokens_of, doc_idx, sample_idx, shuf, i, seq_len):
    j = shuf[i]
    (b, bo), (e, eo) = sample_idx[j], sample_idx[j + 1]
    out = []
    for p in range(b, e + 1):
        toks = tokens_of(doc_idx[p])
        lo = bo if p == b else 0
        hi = eo + 1 if p == e else len(toks)
        out.extend(toks[lo:hi])
    return out


CASES = [
    # (n docs, max doc len, num_samples, seq_len, seed, split range)
    (50, 40, 10, 16, 1, None),       # one epoch
    (30, 25, 100, 8, 7, None),       # many epochs, final epoch large
    (40, 30, 70, 16, 3, (5, 35)),    # several epochs, final epoch separated (< 80%)
    (20, 5, 300, 4, 11, (0, 20)),    # docs shorter than a sample
    (10, 200, 5, 64, 5, (2, 9)),     # samples inside one document
]


@pytest.mark.parametrize("n,maxlen,num_samples,seq_len,seed,rng", CASES)
def test_indices_equal_reference(n, maxlen, num_samples, seq_len, seed, rng):
    r = np.random.default_rng(seed)
    sizes = r.integers(1, maxlen, n).astype(np.int32)
    lo, hi = rng or (0, n)
    indices = np.arange(lo, hi, dtype=np.int32)
    ours = build_gpt_indices(sizes, indices, num_samples, seq_len, seed)
    doc_idx, sample_idx, shuf = ref_indices(sizes, indices.tolist(), num_samples, seq_len, seed)
    np.testing.assert_array_equal(ours["document_index"], doc_idx)
    np.testing.assert_array_equal(ours["sample_index"], sample_idx)
    np.testing.assert_array_equal(ours["shuffle_index"], shuf)
    assert ours["document_index"].dtype == np.int32
    assert ours["sample_index"].dtype == np.int32
    assert ours["shuffle_index"].dtype == np.uint32
    assert len(ours["sample_index"]) - 1 >= num_samples


def test_separate_final_epoch_case_is_exercised():
    # guard that CASES really covers Megatron's separate-final-epoch branch
    sizes = np.random.default_rng(3).integers(1, 30, 40).astype(np.int32)
    tokens = int(sizes[5:35].sum())
    epochs = -(-(70 * 16 + 1) // tokens)
    sans = ((epochs - 1) * tokens - 1) // 16
    assert epochs > 1 and 70 - sans < int(0.8 * ((tokens - 1) // 16))


def test_sample_index_with_empty_documents_and_partial_last():
    """Zero-length documents and drop_last=False follow the helper's walk too."""
    def ref(sizes, doc_idx, L, E, tpe, drop):
        total = E * tpe
        ns = (total - 1) // L if drop else int(math.ceil(np.float32(total - 1) / np.float32(L)))
        rows, di, off = [(0, 0)], 0, 0
        while len(rows) <= ns:
            rem = L + 1
            while rem:
                dl = sizes[doc_idx[di]] - off
                rem -= dl
                if rem <= 0:
                    off += rem + dl - 1
                    rem = 0
                elif di == len(doc_idx) - 1:
                    off = sizes[doc_idx[di]] - 1
                    break
                else:
                    di, off = di + 1, 0
            rows.append((di, off))
        return np.array(rows)

    r = np.random.default_rng(0)
    for _ in range(200):
        n = int(r.integers(1, 25))
        sizes = r.integers(0, 30, n).astype(np.int32)
        if sizes.sum() < 2 or sizes[-1] == 0:
            continue
        L, E = int(r.integers(2, 12)), int(r.integers(1, 3))
        doc_idx = np.tile(np.arange(n, dtype=np.int32), E)
        r.shuffle(doc_idx[:-1])
        for drop in (True, False):
            ours = build_sample_index(sizes, doc_idx, L, E, int(sizes.sum()), drop)
            np.testing.assert_array_equal(ours, ref(sizes, doc_idx, L, E, int(sizes.sum()), drop))


def test_samples_equal_reference_concatenation(tmp_path):
    r = np.random.default_rng(4)
    eod = 3
    docs = [r.integers(10, 500, r.integers(1, 60)).tolist() + [eod] for _ in range(40)]
    prefix = str(tmp_path / "d")
    write_dataset(prefix, docs)
    sizes = np.array([len(d) for d in docs], np.int32)
    ds = GPTDataset(prefix, "train", (0, 40), 50, 32, 9, str(tmp_path / "cache"), eod_id=eod)
    doc_idx, sample_idx, shuf = ref_indices(sizes, list(range(40)), 50, 32, 9)
    assert len(ds) == len(sample_idx) - 1
    for i in range(len(ds)):
        s = ds[i]
        expect = ref_sample(sizes, lambda d: docs[d], doc_idx, sample_idx, shuf, i, 32)
        assert s["tokens"].dtype == np.int64 and s["tokens"].tolist() == expect
        # segment ids: count of EODs strictly before each position (Megatron's reset points)
        seg, n_eod = [], 0
        for t in expect:
            seg.append(n_eod)
            n_eod += t == eod
        assert s["segment_ids"].tolist() == seg


def test_cache_written_once_and_memory_mapped(tmp_path):
    prefix = str(tmp_path / "d")
    write_dataset(prefix, [[5] * 20 + [3]] * 30)
    cache = str(tmp_path / "cache")
    a = GPTDataset(prefix, "train", (0, 30), 40, 16, 1, cache, eod_id=3)
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith(".npy")]) == 3
    assert any(f.endswith("description.txt") for f in files)
    assert not [f for f in files if ".tmp" in f]
    mtimes = {f: os.path.getmtime(os.path.join(cache, f)) for f in files}
    b = GPTDataset(IndexedDataset(prefix), "train", (0, 30), 40, 16, 1, cache, eod_id=3)
    assert {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)} == mtimes
    assert isinstance(b.sample_index, np.memmap)
    np.testing.assert_array_equal(a.sample_index, b.sample_index)
    # a different seed is a different cache entry
    GPTDataset(prefix, "train", (0, 30), 40, 16, 2, cache, eod_id=3)
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 6


def test_torn_cache_is_rebuilt(tmp_path):
    prefix = str(tmp_path / "d")
    write_dataset(prefix, [[5] * 20 + [3]] * 30)
    cache = str(tmp_path / "cache")
    expect = np.array(GPTDataset(prefix, "train", (0, 30), 40, 16, 1, cache, eod_id=3).sample_index)
    victim = [f for f in os.listdir(cache) if f.endswith("sample_index.npy")][0]
    with open(os.path.join(cache, victim), "r+b") as f:
        f.truncate(20)
    b = GPTDataset(prefix, "train", (0, 30), 40, 16, 1, cache, eod_id=3)
    np.testing.assert_array_equal(expect, np.asarray(b.sample_index))


def test_padding_marks_segments(tmp_path):
    prefix = str(tmp_path / "d")
    write_dataset(prefix, [[7] * 9 + [3]] * 3)  # 30 tokens
    ds = GPTDataset(prefix, "valid", (0, 3), None, 8, 1, None, eod_id=3, pad_id=0, drop_last_partial=False)
    last = [ds[i] for i in range(len(ds)) if (ds[i]["segment_ids"] < 0).any()]
    assert len(last) == 1
    s = last[0]
    pad = s["segment_ids"] < 0
    assert (s["tokens"][pad] == 0).all() and pad[-1]


def test_tokenizer_corpus_dataset(gpt_prefix, tokenizer, tmp_path):
    ds = GPTDataset(gpt_prefix, "train", (0, 100), 20, 128, 1234, str(tmp_path), eod_id=tokenizer.eod)
    s = ds[0]
    assert s["tokens"].shape == (129,)
    text = tokenizer.decode([t for t in s["tokens"].tolist() if t != tokenizer.eod])
    assert len(text) > 100


def test_pickles_without_copying_the_data(tmp_path):
    import pickle

    prefix = str(tmp_path / "d")
    write_dataset(prefix, [[10 + j % 100 for j in range(n * 50)] + [3] for n in range(1, 200)])  # ~2 MB
    ds = GPTDataset(prefix, "train", (0, 199), 30, 16, 1, str(tmp_path / "c"), eod_id=3)
    blob = pickle.dumps(ds)
    assert len(blob) < 60_000  # indices are small here; the token file must not travel
    copy = pickle.loads(blob)
    assert all((copy[i]["tokens"] == ds[i]["tokens"]).all() for i in range(len(ds)))


def test_unwritable_cache_dir_builds_in_memory(tmp_path):
    prefix = str(tmp_path / "d")
    write_dataset(prefix, [[5] * 20 + [3]] * 30)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ds = GPTDataset(prefix, "train", (0, 30), 40, 16, 1, str(blocker / "cache"), eod_id=3)
    ref = GPTDataset(prefix, "train", (0, 30), 40, 16, 1, None, eod_id=3)
    np.testing.assert_array_equal(ds.sample_index, ref.sample_index)
