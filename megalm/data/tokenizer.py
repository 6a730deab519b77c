"""SentencePiece tokenizer wrapper: ids of the special tokens, encode/decode, word starts.

The preprocess tool and every dataset/objective read special ids from here,
so a model trained by ``megalm train-tokenizer`` and a foreign one (Llama-style,
without <mask>) both load; absent special pieces are ``None``.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import numpy as np

from megalm.errors import DataError

# Piece names reserved by megalm.data.train_tokenizer (control symbols: never produced from text).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MASK, CLS, SEP = "<mask>", "<cls>", "<sep>"
WORD_START = "\u2581"  # SentencePiece's meta symbol for a preceding space


class Tokenizer:
    """A loaded SentencePiece model. ``eos`` doubles as ``eod`` (Megatron's convention)."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm

        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise DataError(f"tokenizer model not found: {self.model_path} (train one with `megalm train-tokenizer`)")
        sp = spm.SentencePieceProcessor()
        try:
            with open(self.model_path, "rb") as f:
                blob = f.read()
            sp.LoadFromSerializedProto(blob)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise DataError(
                f"tokenizer model {self.model_path} is not a valid SentencePiece model ({e})"
            ) from None
        if sp.get_piece_size() <= 0:
            raise DataError(f"tokenizer model {self.model_path} has an empty vocabulary")
        self.sp = sp
        self.vocab_size: int = sp.get_piece_size()
        self.unk: Optional[int] = _nonneg(sp.unk_id())
        self.bos: Optional[int] = _nonneg(sp.bos_id())
        self.eos: Optional[int] = _nonneg(sp.eos_id())
        self.pad: Optional[int] = _nonneg(sp.pad_id())
        self.mask: Optional[int] = self._piece(MASK)
        self.cls: Optional[int] = self._piece(CLS)
        self.sep: Optional[int] = self._piece(SEP)
        self._word_start: Optional[np.ndarray] = None

    @property
    def eod(self) -> Optional[int]:
        """End-of-document id appended by preprocess: the model's eos, as in Megatron-LM."""
        return self.eos

    def _piece(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        # piece_to_id returns unk for an unknown piece
        if i == self.sp.unk_id() and piece != UNK:
            return None
        return int(i)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def word_start_table(self) -> np.ndarray:
        """bool[vocab]: True where a piece begins a word (starts with '▁') or is a special symbol."""
        if self._word_start is None:
            sp = self.sp
            table = np.zeros(self.vocab_size, dtype=bool)
            for i in range(self.vocab_size):
                table[i] = (
                    sp.id_to_piece(i).startswith(WORD_START)
                    or sp.is_control(i)
                    or sp.is_unknown(i)
                    or (sp.id_to_piece(i) == "\n")
                )
            self._word_start = table
        return self._word_start

    def is_word_start(self, ids: np.ndarray) -> np.ndarray:
        """Vectorised lookup for whole-word masking: bool array shaped like ``ids``."""
        ids = np.asarray(ids)
        table = self.word_start_table()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DataError(f"token id out of range [0, {self.vocab_size}) for tokenizer {self.model_path}")
        return table[ids]

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, eos={self.eos}, pad={self.pad})"


def _nonneg(i: int) -> Optional[int]:
    return int(i) if i >= 0 else None
