"""Token ids outside model.vocab_size are a DataError that names the dataset, the sample and its documents."""

import numpy as np
import pytest

from megalm.data.blend import BlendedDataset
from megalm.data.gpt_dataset import GPTDataset
from megalm.data.vocab_guard import VocabGuard
from megalm.errors import DataError
from tests.data.conftest import write_docs


def _docs(n: int, bad_doc: int, bad_id: int) -> list:
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 100, size=40)) for _ in range(n)]
    docs[bad_doc][7] = bad_id
    return docs


def _fetch_all(ds, vocab: int) -> None:
    guard = VocabGuard(ds, vocab)
    for i in range(len(ds)):
        guard(i, ds[i])


def test_out_of_vocab_id_names_dataset_sample_and_document(tmp_path):
    prefix = str(tmp_path / "big_vocab")
    write_docs(prefix, _docs(6, bad_doc=4, bad_id=130), np.int32)
    ds = GPTDataset(prefix, "train", (0, 6), None, 16, 1, str(tmp_path / "cache"), eod_id=None)
    with pytest.raises(DataError, match=rf"dataset {prefix}\.bin/\.idx \(train split\), sample \d+, made of "
                                        r"sequence\(s\) (\d+, )*4\b.* token id 130, outside model.vocab_size=120"):
        _fetch_all(ds, 120)
    _fetch_all(ds, 131)  # a vocabulary that holds it: no error


def test_negative_ids_and_blends_are_caught(tmp_path):
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    write_docs(good, _docs(4, 0, 5), np.int32)
    write_docs(bad, _docs(4, bad_doc=2, bad_id=-3), np.int32)
    parts = [GPTDataset(p, "train", (0, 4), None, 16, 1, str(tmp_path / "cache"), eod_id=None) for p in (good, bad)]
    blend = BlendedDataset(parts, [0.5, 0.5], 16, str(tmp_path / "cache"))
    with pytest.raises(DataError, match=rf"{bad}\.bin.*member 1 of the blend, blended sample \d+.* token id -3"):
        _fetch_all(blend, 120)
