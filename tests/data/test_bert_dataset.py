import numpy as np
import pytest

from megalm.data.bert_dataset import BertPairDataset, _truncate_pair
from megalm.data.preprocess import Options, preprocess
from megalm.errors import DataError


@pytest.fixture(scope="module")
def sentence_prefix(tmp_path_factory, corpus_path, tokenizer):
    out = str(tmp_path_factory.mktemp("bert") / "c")
    preprocess([corpus_path], out, tokenizer.model_path, Options(split_sentences=True), workers=0, progress=False)
    return out + "_text_sentence"


def _layout(s, tok, L):
    t, types, n = s["tokens"], s["token_types"], s["length"]
    assert t.shape == types.shape == (L,) and t.dtype == np.int64
    assert t[0] == tok.cls and t[n - 1] == tok.sep and (t[n:] == tok.pad).all() and (types[n:] == 0).all()
    seps = np.flatnonzero(t[:n] == tok.sep)
    assert len(seps) == 2
    a, b = t[1:seps[0]], t[seps[0] + 1:seps[1]]
    assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:n] == 1).all()
    assert len(a) and len(b)
    return a, b


def _doc_tokens(ds, start):
    di = ds.indexed.document_indices
    d = int(np.searchsorted(di, start, side="right") - 1)
    return d, np.concatenate([ds.indexed[s] for s in range(int(di[d]), int(di[d + 1]))])


def _contains(hay, needle):
    hay, needle = hay.tolist(), needle.tolist()
    return any(hay[i:i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))


def test_sop_pairs(sentence_prefix, tokenizer, tmp_path):
    L = 64
    ds = BertPairDataset(sentence_prefix, "train", (0, 80), 300, L, 7, str(tmp_path), tokenizer, "sop")
    assert len(ds) >= 300
    swapped = 0
    for i in range(200):
        s = ds[i]
        a, b = _layout(s, tokenizer, L)
        start, end, _ = (int(x) for x in ds.samples[i])
        run = np.concatenate([ds.indexed[j] for j in range(start, end)])
        first, second = (b, a) if s["is_random"] else (a, b)
        # both segments come from this run, in document order once un-swapped
        assert _contains(run, first) and _contains(run, second)
        if len(first) + len(second) == len(run):
            assert (np.concatenate([first, second]) == run).all()
        swapped += int(s["is_random"])
    assert 60 < swapped < 140
    again = BertPairDataset(sentence_prefix, "train", (0, 80), 300, L, 7, str(tmp_path), tokenizer, "sop")
    assert all((again[i]["tokens"] == ds[i]["tokens"]).all() for i in range(0, 200, 9))


def test_nsp_random_b_comes_from_another_document(sentence_prefix, tokenizer):
    L = 48
    ds = BertPairDataset(sentence_prefix, "train", (0, 80), 200, L, 3, None, tokenizer, "nsp")
    n_random = 0
    for i in range(150):
        s = ds[i]
        a, b = _layout(s, tokenizer, L)
        d, doc = _doc_tokens(ds, int(ds.samples[i][0]))
        assert _contains(doc, a)
        if s["is_random"]:
            n_random += 1
        else:
            assert _contains(doc, b)
    assert 40 < n_random < 110


def test_no_binary_head_and_split_by_document(sentence_prefix, tokenizer):
    ds = BertPairDataset(sentence_prefix, "valid", (80, 90), 20, 32, 1, None, tokenizer, "none")
    di = ds.indexed.document_indices
    for i in range(len(ds)):
        assert ds[i]["is_random"] == 0
        start, end, _ = ds.samples[i]
        assert di[80] <= start < end <= di[90]


def test_truncate_pair_trims_longer_side():
    rng = np.random.RandomState(0)
    a, b = _truncate_pair(np.arange(10), np.arange(100, 104), 8, rng)
    assert len(a) + len(b) == 8 and len(b) == 4 and len(a) == 4
    assert _contains(np.arange(10), a)


def test_needs_sentences_and_special_tokens(tmp_path, tokenizer, corpus_path):
    out = str(tmp_path / "d")
    preprocess([corpus_path], out, tokenizer.model_path, Options(append_eod=True), workers=0, progress=False)
    with pytest.raises(DataError, match="split-sentences"):
        BertPairDataset(out + "_text_document", "train", (0, 50), 10, 64, 1, None, tokenizer, "sop")

    class NoCls:
        cls, sep, pad, model_path = None, 6, 0, "x.model"

    with pytest.raises(DataError, match="cls"):
        BertPairDataset(out + "_text_document", "train", (0, 50), 10, 64, 1, None, NoCls(), "sop")
