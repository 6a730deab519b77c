"""Shared fixtures for the data tests: a tiny tokenizer trained once per session, the bundled corpus."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CORPUS = os.path.join(FIXTURES, "corpus.jsonl")


@pytest.fixture(scope="session")
def corpus_path() -> str:
    return CORPUS


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    with open(CORPUS) as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    from megalm.data.train_tokenizer import train

    prefix = str(tmp_path_factory.mktemp("tok") / "spm")
    train([CORPUS], prefix, vocab_size=600, model_type="bpe", num_threads=1)
    return prefix + ".model"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from megalm.data.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path)


def write_docs(prefix: str, docs, dtype=np.uint16) -> None:
    from megalm.data.indexed import write_dataset

    write_dataset(prefix, docs, dtype)


@pytest.fixture(scope="session")
def gpt_prefix(tmp_path_factory, tokenizer, corpus_texts) -> str:
    """The corpus tokenized one document per sequence with EOD, as preprocess writes it."""
    prefix = str(tmp_path_factory.mktemp("gptdata") / "corpus_text_document")
    write_docs(prefix, [tokenizer.encode(t) + [tokenizer.eod] for t in corpus_texts])
    return prefix
