import os

import numpy as np
import pytest

from megalm.data.tokenizer import Tokenizer
from megalm.errors import DataError


def test_special_ids_are_reserved(tokenizer):
    t = tokenizer
    assert (t.pad, t.unk, t.bos, t.eos) == (0, 1, 2, 3)
    assert t.eod == t.eos
    specials = {t.mask, t.cls, t.sep}
    assert None not in specials and len(specials) == 3
    assert all(i < 10 for i in specials)
    assert t.vocab_size == 600
    # control symbols are never produced from text, even when the text spells them
    ids = t.encode("<mask> <cls> <sep> </s>")
    assert not set(ids) & {t.mask, t.cls, t.sep, t.eos, t.pad}


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x  # two  spaces\n\n\tTabbed",
    "  leading and trailing  ",
    "Numbers 12345 and 3.14159\r\nCRLF line",
    "Unicode: café, naïve, 日本語, emoji \U0001F600",
])
def test_roundtrip_keeps_whitespace_and_bytes(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_split(tokenizer):
    surfaces = [tokenizer.decode([i]) for i in tokenizer.encode("x 1234567 2024")]
    assert all(sum(c.isdigit() for c in s) <= 1 for s in surfaces)
    assert sum(c.isdigit() for s in surfaces for c in s) == 11


def test_newline_is_one_token(tokenizer):
    ids = tokenizer.encode("a\nb")
    assert [tokenizer.id_to_piece(i) for i in ids].count("\n") == 1


def test_is_word_start(tokenizer):
    ids = np.array(tokenizer.encode("the beginning of heaven"))
    starts = tokenizer.is_word_start(ids)
    assert starts.dtype == bool and starts.shape == ids.shape
    # four words -> exactly four word starts
    assert int(starts.sum()) == 4
    assert starts[0]
    with pytest.raises(DataError):
        tokenizer.is_word_start(np.array([tokenizer.vocab_size]))


def test_missing_model_names_the_file(tmp_path):
    path = str(tmp_path / "nope.model")
    with pytest.raises(DataError, match="nope.model"):
        Tokenizer(path)


def test_corrupt_model_names_the_file(tmp_path, tokenizer_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(open(tokenizer_path, "rb").read()[:100])
    with pytest.raises(DataError, match="bad.model"):
        Tokenizer(str(bad))
    junk = tmp_path / "junk.model"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(DataError, match="junk.model"):
        Tokenizer(str(junk))


def test_train_tokenizer_cli(tmp_path, corpus_path):
    from megalm.data.train_tokenizer import main

    prefix = str(tmp_path / "u")
    assert main(["--input", corpus_path, "--vocab-size", "400", "--model-type", "unigram",
                 "--output-prefix", prefix, "--threads", "1"]) == 0
    t = Tokenizer(prefix + ".model")
    assert t.vocab_size == 400 and t.mask is not None
    assert os.path.isfile(prefix + ".vocab")
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_train_tokenizer_no_text(tmp_path):
    from megalm.data.train_tokenizer import train

    empty = tmp_path / "e.jsonl"
    empty.write_text('{"other": "x"}\n')
    with pytest.raises(DataError):
        train([str(empty)], str(tmp_path / "t"), vocab_size=100)
