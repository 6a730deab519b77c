import os

import numpy as np
import pytest

from megalm.config import from_dict
from megalm.data.blend import BlendedDataset, build_blending_indices
from megalm.data.build import build_datasets, parse_blend
from megalm.data.indexed import write_dataset
from megalm.data.split import parse_split, split_ranges
from megalm.errors import ConfigError, DataError
from tests.harness import run_ranks


def make(prefix, n_docs, token, eod=3, seed=0):
    r = np.random.default_rng(seed)
    write_dataset(prefix, [[token] * int(r.integers(5, 60)) + [eod] for _ in range(n_docs)])


def cfg_for(prefix, cache, split="8,1,1", seq=16):
    return from_dict({"data": {"prefix": prefix, "split": split, "cache_dir": cache},
                      "model": {"seq_length": seq}, "train": {"seed": 5}})


class Tok:
    eod = eos = 3
    pad = 0
    vocab_size = 100
    model_path = "/x/tok.model"


def test_split_parsing_matches_megatron_rounding():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    r = split_ranges("969,30,1", 1000)
    assert r == {"train": (0, 969), "valid": (969, 999), "test": (999, 1000)}
    assert split_ranges("90,10,0", 7)["test"] is None
    with pytest.raises(ConfigError):
        parse_split("0,0,0")


def test_parse_blend():
    assert parse_blend("a") == [(1.0, "a")]
    assert parse_blend([0.7, "a", 0.3, "b"]) == [(0.7, "a"), (0.3, "b")]
    assert parse_blend(["a", "b"]) == [(1.0, "a"), (1.0, "b")]
    with pytest.raises(ConfigError):
        parse_blend([0.7, "a", 0.3])
    with pytest.raises(ConfigError):
        parse_blend(None)


def test_single_prefix(tmp_path):
    prefix = str(tmp_path / "a")
    make(prefix, 100, 7)
    out = build_datasets(cfg_for(prefix, str(tmp_path / "c")), Tok(), {"train": 30, "valid": 5, "test": 0})
    assert out["test"] is None
    assert len(out["train"]) >= 30 and len(out["valid"]) >= 5
    train_docs = set(np.asarray(out["train"].document_index).tolist())
    valid_docs = set(np.asarray(out["valid"].document_index).tolist())
    assert train_docs <= set(range(80)) and valid_docs <= set(range(80, 90))
    assert out["train"][0]["tokens"].shape == (17,)


def test_missing_prefix_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope"):
        build_datasets(cfg_for(str(tmp_path / "nope"), None), Tok(), {"train": 1})


def ref_blend(weights, size):
    w = np.array(weights) / sum(weights)
    counts = np.zeros(len(w))
    di, si = [], []
    for i in range(size):
        err = w * max(i, 1) - counts
        d = int(np.argmax(err))  # first max on ties, like the C++ strict '>'
        di.append(d)
        si.append(int(counts[d]))
        counts[d] += 1
    return di, si


@pytest.fixture()
def fresh_native(tmp_path, monkeypatch):
    from megalm.data import native

    monkeypatch.setenv("MEGALM_CACHE", str(tmp_path / "native"))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    yield native


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 2], [0.2, 0.5, 0.1, 0.2], [1.0]])
def test_blending_indices_match_reference(weights, fresh_native):
    rd, rs = ref_blend(weights, 500)
    for native in (False, True):
        di, si = build_blending_indices(weights, 500, native=native)
        assert di.dtype == np.int16 and si.dtype == np.int64
        assert di.tolist() == rd and si.tolist() == rs
    if len(weights) > 1 and fresh_native.library() is not None:  # the compiled path really ran
        assert fresh_native.blend(np.array(weights) / sum(weights), 500)[0].tolist() == rd


def test_blend_from_config(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make(a, 100, 7, seed=1)
    make(b, 100, 9, seed=2)
    cfg = cfg_for([0.75, a, 0.25, b], str(tmp_path / "c"))
    out = build_datasets(cfg, Tok(), {"train": 200, "valid": 10})
    train = out["train"]
    assert isinstance(train, BlendedDataset) and len(train) == 200
    ids = [train[i]["dataset_id"] for i in range(200)]
    assert ids.count(0) == 150
    for i in range(0, 200, 17):  # dataset 0 holds only token 7 (and EOD), dataset 1 only 9
        toks = set(train[i]["tokens"].tolist()) - {3}
        assert toks == ({7} if ids[i] == 0 else {9})
    again = build_datasets(cfg, Tok(), {"train": 200, "valid": 10})["train"]
    assert all((again[i]["tokens"] == train[i]["tokens"]).all() for i in range(0, 200, 13))
    assert os.path.isdir(tmp_path / "c" / "BlendedDataset_indices")


def _distributed_build(rank, world_size, prefix, cache_dirs):
    if rank == 1:
        os.environ["LOCAL_RANK"] = "0"  # rank 1 plays the first rank of a second node
    cfg = cfg_for(prefix, cache_dirs[rank])
    out = build_datasets(cfg, Tok(), {"train": 40, "valid": 4})
    files = sorted(os.listdir(os.path.join(cache_dirs[rank], "GPTDataset_indices")))
    return [out["train"][i]["tokens"].tolist() for i in range(5)], files


@pytest.mark.slow
def test_distributed_shared_and_separate_filesystems(tmp_path):
    prefix = str(tmp_path / "a")
    make(prefix, 100, 7)
    shared = str(tmp_path / "shared")
    (r0, f0), (r1, f1) = run_ranks(_distributed_build, 2, prefix, [shared, shared])
    assert r0 == r1 and f0 == f1 and len([f for f in f0 if f.endswith(".npy")]) == 6
    # separate filesystems: each "node" builds its own identical copy
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    (s0, g0), (s1, g1) = run_ranks(_distributed_build, 2, prefix, dirs)
    assert s0 == s1 == r0 and g0 == g1 == f0


def test_bert_pair_kind(tmp_path, corpus_path, tokenizer):
    from megalm.data.bert_dataset import BertPairDataset
    from megalm.data.preprocess import Options, preprocess

    out = str(tmp_path / "s")
    preprocess([corpus_path], out, tokenizer.model_path, Options(split_sentences=True), workers=0, progress=False)
    cfg = from_dict({"data": {"prefix": out + "_text_sentence", "split": "90,10,0"},
                     "model": {"arch": "bert", "seq_length": 64}, "objective": {"name": "mlm", "binary_head": "nsp"}})
    ds = build_datasets(cfg, tokenizer, {"train": 50, "valid": 5, "test": 5}, kind="bert_pair")
    assert isinstance(ds["train"], BertPairDataset) and ds["train"].binary_head == "nsp"
    assert ds["test"] is None and len(ds["valid"]) >= 5
    assert ds["train"][0]["tokens"].shape == (64,)
    assert os.path.isdir(tmp_path / "cache" / "BertPairDataset_indices")


def _samples(ds, n=8):
    return [ds[i]["tokens"].tolist() for i in range(n)]


def test_reprocessed_dataset_never_reuses_stale_indices(tmp_path, corpus_path, corpus_texts, tokenizer):
    """Same path, same counts, other document order: the old key matched; the .idx fingerprint does not."""
    import json

    from megalm.data.gpt_dataset import GPTDataset
    from megalm.data.indexed import IndexedDataset
    from megalm.data.preprocess import Options, preprocess

    prefix, cache = str(tmp_path / "d"), str(tmp_path / "cache")
    out = prefix + "_text_document"
    src = tmp_path / "c.jsonl"

    def build(order, cache_dir):
        src.write_text("".join(json.dumps({"text": corpus_texts[i]}) + "\n" for i in order))
        preprocess([str(src)], prefix, tokenizer.model_path, Options(append_eod=True), workers=0, progress=False)
        ds = GPTDataset(out, "train", (0, len(IndexedDataset(out))), 40, 32, 5, cache_dir, eod_id=tokenizer.eod)
        idx = ds.indexed
        return ds, [len(idx), idx.num_documents, idx.num_tokens, str(idx.dtype)]

    forward, old_key_a = build(range(len(corpus_texts)), cache)
    first = _samples(forward)
    backward, old_key_b = build(range(len(corpus_texts) - 1, -1, -1), cache)
    assert old_key_a == old_key_b  # what the cache was keyed on before: identical for both corpora
    assert backward.cache_key != forward.cache_key
    fresh, _ = build(range(len(corpus_texts) - 1, -1, -1), None)
    assert _samples(backward) == _samples(fresh) != first
    assert len([f for f in os.listdir(os.path.join(cache)) if f.endswith("-description.txt")]) == 2


def _cfg(cache, **data):
    return from_dict({"data": {"cache_dir": cache, **data}, "model": {"seq_length": 16}, "train": {"seed": 5}})


def test_separate_train_valid_test_paths(tmp_path):
    a, b, v, t = (str(tmp_path / n) for n in "abvt")
    make(a, 60, 7)
    make(b, 60, 8, seed=1)
    make(v, 30, 9, seed=2)
    make(t, 30, 11, seed=3)
    cache = str(tmp_path / "c")
    cfg = _cfg(cache, train=[0.5, a, 0.5, b], valid=v, test=t, split="1,0,0")  # split is ignored
    out = build_datasets(cfg, Tok(), {"train": 40, "valid": 10, "test": 10})
    tokens = {s: {x for i in range(len(out[s])) for x in out[s][i]["tokens"].tolist()} - {3} for s in out}
    assert tokens["train"] == {7, 8} and tokens["valid"] == {9} and tokens["test"] == {11}
    # every document of the valid set is used (no split cut)
    assert set(np.asarray(out["valid"].document_index).tolist()) == set(range(30))
    again = build_datasets(cfg, Tok(), {"train": 40, "valid": 10, "test": 10})  # same caches, same samples
    assert _samples(again["valid"]) == _samples(out["valid"])
    assert build_datasets(_cfg(cache, train=a), Tok(), {"train": 5, "valid": 5})["valid"] is None


@pytest.mark.parametrize("data, match", [
    ({"train": "A", "prefix": "A"}, "data.prefix and data.train"),
    ({"valid": "A"}, "data.train is not"),
    ({"train": "A", "valid": [0.5, "A", 0.5]}, "data.valid blend"),
    ({"train": "A", "valid": "MISSING"}, r"MISSING.bin/.idx not found \(data.valid\)"),
])
def test_separate_paths_errors_name_the_key(tmp_path, data, match):
    a = str(tmp_path / "a")
    make(a, 20, 7)
    data = {k: ([x.replace("A", a) if isinstance(x, str) else x for x in v] if isinstance(v, list)
                else v.replace("A", a).replace("MISSING", str(tmp_path / "MISSING"))) for k, v in data.items()}
    with pytest.raises((ConfigError, DataError), match=match):
        build_datasets(_cfg(str(tmp_path / "c"), **data), Tok(), {"train": 5, "valid": 5})


def _failing_build(rank, world_size, cache):
    import time

    from megalm.data.cache import cached_arrays

    def build():
        if rank == 0:
            raise DataError("disk full while building (simulated)")
        raise AssertionError("only rank 0 builds")

    t0 = time.time()
    try:
        cached_arrays(cache, "X", {"k": 1}, build)
    except DataError as e:
        return str(e), time.time() - t0
    return None, time.time() - t0


@pytest.mark.slow
def test_rank0_build_failure_fails_every_rank_at_once(tmp_path):
    (m0, t0), (m1, t1) = run_ranks(_failing_build, 2, str(tmp_path / "c"), timeout=120)
    assert m0 == "disk full while building (simulated)"
    assert "rank 0 failed to build the index cache" in m1 and "disk full" in m1
    assert t1 < 20
