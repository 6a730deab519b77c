"""Fixtures for the objective tests: a toy tokenizer for masking statistics, sentence-split KJV data for BERT.

``tiny_data`` (tokenizer + GPT-style documents) comes from the training tests;
``bert_data`` adds the same corpus split into sentences, as ``megalm preprocess
--split-sentences`` writes it for BERT pairs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.training.conftest import FIXTURE_CORPUS, ROOT, tiny_data  # noqa: F401  (fixture re-export)


class ToyTokenizer:
    """Specials at 0..6, the rest ordinary; every third id continues a word (for whole-word masking)."""

    def __init__(self, vocab_size: int = 120):
        self.vocab_size = vocab_size
        self.pad, self.unk, self.bos, self.eos, self.mask, self.cls, self.sep = range(7)
        self.model_path = "toy"

    @property
    def eod(self) -> int:
        return self.eos

    def is_word_start(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids < 7) | (ids % 3 != 0)


class EmbeddingTap:
    """Replaces the word-embedding output by a leaf tensor, so d(loss)/d(input embedding) is readable."""

    def __init__(self, model):
        self.leaf = None
        model.embedding.word.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.leaf = output.detach().requires_grad_(True)
        return self.leaf


@pytest.fixture()
def toy_tokenizer() -> ToyTokenizer:
    return ToyTokenizer()


def bert_samples(tok: ToyTokenizer, n: int, seq: int, rng: np.random.Generator) -> list[dict]:
    """BertPairDataset-shaped samples: [CLS] A [SEP] B [SEP] + padding, random lengths."""
    out = []
    for _ in range(n):
        length = int(rng.integers(seq // 2, seq + 1))
        a = int(rng.integers(1, length - 3))
        tokens = np.full(seq, tok.pad, dtype=np.int64)
        body = rng.integers(7, tok.vocab_size, size=length)
        tokens[:length] = body
        tokens[0], tokens[a + 1], tokens[length - 1] = tok.cls, tok.sep, tok.sep
        types = np.zeros(seq, dtype=np.int64)
        types[a + 2:length] = 1
        out.append({"tokens": tokens, "token_types": types, "is_random": np.int64(rng.integers(0, 2)),
                    "length": length})
    return out


@pytest.fixture(scope="session")
def bert_data(tiny_data, tmp_path_factory):  # noqa: F811
    """(tokenizer path, sentence-split dataset prefix) from the bundled KJV excerpt."""
    tok, _ = tiny_data
    out = tmp_path_factory.mktemp("bert_data")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "megalm.cli", "preprocess", "--input", FIXTURE_CORPUS, "--split-sentences",
                    "--tokenizer-model", tok, "--output-prefix", str(out / "kjv"), "--workers", "0", "--no-progress"],
                   check=True, capture_output=True, env=env, cwd=ROOT)
    return tok, str(out / "kjv_text_sentence")
