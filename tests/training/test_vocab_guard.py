"""A dataset tokenized with a larger vocabulary than the model's fails fast through pretrain.py, at any TP size.

Id 603 with a 600-piece tokenizer is the silent case: the padded embedding (608 rows) holds it, so without
the guard training would run on, updating a padding row.
"""

import numpy as np
import pytest

from megalm.data.indexed import IndexedDataset, write_dataset
from tests.training.conftest import run_pretrain


@pytest.fixture(scope="module")
def big_vocab_data(tiny_data, tmp_path_factory):
    tok, prefix = tiny_data
    indexed = IndexedDataset(prefix)
    docs = [np.array(indexed[i], dtype=np.int32) for i in range(len(indexed))]
    for d in docs:
        d[::25] = 603  # in every 33-token sample
    out = str(tmp_path_factory.mktemp("big_vocab") / "bigvocab_text_document")
    write_dataset(out, docs, np.uint16)
    return tok, out


@pytest.mark.slow
@pytest.mark.parametrize("tensor", [1, 2])
def test_ids_beyond_the_vocabulary_stop_before_the_first_update(tensor, big_vocab_data, tmp_path):
    code, records, err = run_pretrain(big_vocab_data, tmp_path, nproc=tensor, check=False,
                                      launcher="python" if tensor == 1 else "torchrun",
                                      overrides=[f"parallel.tensor={tensor}", "train.iters=2"])
    assert code == (2 if tensor == 1 else 1), err[-3000:]  # torchrun reports a failed rank (exit 2) as 1
    assert f"dataset {big_vocab_data[1]}.bin/.idx (train split), sample" in err
    assert "token id 603, outside model.vocab_size=600" in err
    assert records == []  # not one step was taken
