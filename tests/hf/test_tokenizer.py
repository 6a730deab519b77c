"""AutoTokenizer on an export encodes and decodes exactly like the SentencePiece model megalm trained with."""

from __future__ import annotations

import json
import os

import pytest

from megalm.data.tokenizer import Tokenizer
from megalm.hf.tokenizer import save_tokenizer

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EDGE = ["", " ", "  two  spaces", "\n", "\nstarts with a newline", "a\n b\n\n\nc", "tab\there", "trailing \n",
        "digits 1234567890 and 3.14", "é ü 中文 🙂 — “quotes”", "x" * 300, "   indented\n    code()\n"]


def _texts(limit: int = 150) -> list:
    """Real documents: the bundled Austen corpus and the KJV test fixture (both ship with the repo)."""
    files = [os.path.join(ROOT, "data", "corpus", "austen.jsonl"), os.path.join(ROOT, "tests", "fixtures", "kjv_small.jsonl")]
    out = []
    for path in files:
        with open(path) as f:
            for n, line in enumerate(f):
                if n >= limit:
                    break
                out.append(json.loads(line)["text"])
    return out


@pytest.fixture(scope="module")
def pair(tok_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok"))
    ids = save_tokenizer(tok_model, out)
    return Tokenizer(tok_model), transformers.AutoTokenizer.from_pretrained(out), ids


def test_same_ids_and_text_on_real_documents(pair):
    sp, hf, _ = pair
    texts = _texts() + EDGE
    assert len(texts) > 50
    for text in texts:
        ids = sp.encode(text)
        assert hf(text)["input_ids"] == ids, repr(text[:80])
        assert hf.encode(text) == ids  # no bos/eos added: megalm's preprocess adds eod itself
        assert hf.decode(ids) == sp.decode(ids) == text, repr(text[:80])


def test_special_token_ids_match(pair):
    sp, hf, ids = pair
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (sp.pad, sp.unk, sp.bos, sp.eos)
    assert (hf.mask_token_id, hf.cls_token_id, hf.sep_token_id) == (sp.mask, sp.cls, sp.sep)
    assert ids["eos_token_id"] == sp.eos and ids["mask_token_id"] == sp.mask
    assert len(hf) == sp.vocab_size
    # a special token written in the text is that token; the text around it encodes as megalm joins documents
    a, b = "In the beginning", "And God said"
    assert hf(a + hf.eos_token + b)["input_ids"] == sp.encode(a) + [sp.eos] + sp.encode(b)
    assert hf(f"{hf.bos_token}{a}")["input_ids"] == [sp.bos] + sp.encode(a)
    assert hf.decode(sp.encode(a) + [sp.eos], skip_special_tokens=True) == a


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_larger_vocab_both_model_types(tmp_path, model_type):
    """A 2000-piece model (more merges, whitespace pieces) of each type, on held-out text."""
    from megalm.data.train_tokenizer import train

    corpus = os.path.join(ROOT, "tests", "fixtures", "kjv_small.jsonl")
    sp = train([corpus], str(tmp_path / "t"), vocab_size=2000, model_type=model_type, num_threads=1)
    save_tokenizer(sp.model_path, str(tmp_path / "hf"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in _texts(40) + EDGE:
        assert hf(text)["input_ids"] == sp.encode(text), repr(text[:80])


def test_not_a_sentencepiece_model(tmp_path):
    from megalm.errors import DataError

    bad = tmp_path / "x.model"
    bad.write_bytes(b"\x00\x01 not a proto")
    with pytest.raises(DataError, match="x.model"):
        save_tokenizer(str(bad), str(tmp_path / "out"))
