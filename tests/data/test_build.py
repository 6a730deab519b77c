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
                     "model": {"seq_length": 64}, "objective": {"name": "mlm", "binary_head": "nsp"}})
    ds = build_datasets(cfg, tokenizer, {"train": 50, "valid": 5, "test": 5}, kind="bert_pair")
    assert isinstance(ds["train"], BertPairDataset) and ds["train"].binary_head == "nsp"
    assert ds["test"] is None and len(ds["valid"]) >= 5
    assert ds["train"][0]["tokens"].shape == (64,)
    assert os.path.isdir(tmp_path / "cache" / "BertPairDataset_indices")
