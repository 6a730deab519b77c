"""One tokenizer interface for the data path: SentencePiece ``.model``, HF ``tokenizer.json``, GPT-2 BPE.

Preprocess, datasets, objectives, checkpoints, export and generation all go
through ``load_tokenizer(path)``; special ids (eod, pad, mask, cls, sep) are
resolved per kind the way Megatron-LM does, and are ``None`` when absent.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from megalm.errors import DataError

# Piece names reserved by megalm.data.train_tokenizer (control symbols: never produced from text).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MASK, CLS, SEP = "<mask>", "<cls>", "<sep>"
WORD_START = "\u2581"  # SentencePiece's meta symbol for a preceding space
BYTE_SPACE = "\u0120"  # byte-level BPE's "Ġ": the token starts with a space
ENDOFTEXT = "<|endoftext|>"  # GPT-2's end of document

KINDS = ("sentencepiece", "huggingface", "gpt2bpe")
# Megatron-LM --tokenizer-type names -> kind
MEGATRON_TYPES = {
    "SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece", "HuggingFaceTokenizer": "huggingface", "GPT2BPETokenizer": "gpt2bpe",
}


class BaseTokenizer:
    """What every kind provides. ``eod`` is the id preprocess appends after each document."""

    kind = ""
    model_path: str = ""
    vocab_size: int = 0
    unk: Optional[int] = None
    bos: Optional[int] = None
    eos: Optional[int] = None
    pad: Optional[int] = None
    mask: Optional[int] = None
    cls: Optional[int] = None
    sep: Optional[int] = None
    _word_start: Optional[np.ndarray] = None

    @property
    def eod(self) -> Optional[int]:
        return self.eos

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_long(self, text: str, dtype) -> np.ndarray:
        """``encode(text)`` as an array, in ~1M-character pieces cut where the tokenizer provably cuts too
        (so a 200 MB document costs a few times its size, not a Python int per token at once); whole when
        this tokenizer has no such cut point."""
        return np.asarray(self.encode(text), dtype)

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def files(self) -> dict[str, str]:
        """{name in a checkpoint's megalm/ dir: source path}: what reloads this tokenizer elsewhere."""
        raise NotImplementedError

    def _is_word_start_piece(self, i: int) -> bool:
        p = self.id_to_piece(i)
        return p.startswith((WORD_START, BYTE_SPACE)) or p == "\n" or i in self._special_set()

    def _special_set(self) -> set:
        return {i for i in (self.unk, self.bos, self.eos, self.pad, self.mask, self.cls, self.sep) if i is not None}

    def word_start_table(self) -> np.ndarray:
        """bool[vocab]: True where a piece begins a word (a leading space marker) or is a special symbol."""
        if self._word_start is None:
            self._word_start = np.fromiter((self._is_word_start_piece(i) for i in range(self.vocab_size)), bool,
                                           count=self.vocab_size)
        return self._word_start

    def is_word_start(self, ids: np.ndarray) -> np.ndarray:
        """Vectorised lookup for whole-word masking: bool array shaped like ``ids``."""
        ids = np.asarray(ids)
        table = self.word_start_table()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DataError(f"token id out of range [0, {self.vocab_size}) for tokenizer {self.model_path}")
        return table[ids]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.model_path!r}, vocab_size={self.vocab_size}, eod={self.eod}, "
                f"pad={self.pad})")


class SentencePieceTokenizer(BaseTokenizer):
    """A loaded SentencePiece model. ``eos`` doubles as ``eod`` (Megatron's convention)."""

    kind = "sentencepiece"

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
        except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError with C++ text
            raise DataError(
                f"tokenizer model {self.model_path} is not a valid SentencePiece model ({e})"
            ) from None
        if sp.get_piece_size() <= 0:
            raise DataError(f"tokenizer model {self.model_path} has an empty vocabulary")
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.unk = _nonneg(sp.unk_id())
        self.bos = _nonneg(sp.bos_id())
        self.eos = _nonneg(sp.eos_id())
        self.pad = _nonneg(sp.pad_id())
        self.mask = self._piece(MASK)
        self.cls = self._piece(CLS)
        self.sep = self._piece(SEP)
        self._word_start = None

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

    def encode_long(self, text: str, dtype) -> np.ndarray:
        # "\n" as a user-defined piece is atomic and no piece spans it, so with identity normalisation
        # encode(a + "\n" + b) == encode(a) + encode_without_dummy_prefix("\n" + b)
        nodp = self._no_dummy_prefix()
        if nodp is None:
            return super().encode_long(text, dtype)
        parts, first = [], True
        for piece in _cuts(text, newline_first=True):
            parts.append(np.asarray((self.sp if first else nodp).encode(piece, out_type=int), dtype))
            first = False
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    def _no_dummy_prefix(self):
        if not hasattr(self, "_nodp"):
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2 as pb

            self._nodp = None
            proto = pb.ModelProto()
            with open(self.model_path, "rb") as f:
                proto.ParseFromString(f.read())
            nl = [p for p in proto.pieces if p.piece == "\n" and p.type == 4]  # USER_DEFINED
            norm = proto.normalizer_spec
            if nl and not len(norm.precompiled_charsmap) and not norm.remove_extra_whitespaces:
                norm.add_dummy_prefix = False
                sp = spm.SentencePieceProcessor()
                sp.LoadFromSerializedProto(proto.SerializeToString())
                self._nodp = sp
        return self._nodp

    def _is_word_start_piece(self, i: int) -> bool:
        sp = self.sp
        return (sp.id_to_piece(i).startswith(WORD_START) or sp.is_control(i) or sp.is_unknown(i)
                or sp.id_to_piece(i) == "\n")

    def files(self) -> dict[str, str]:
        return {"tokenizer.model": self.model_path}


# Kept for code and tests written when SentencePiece was the only kind.
Tokenizer = SentencePieceTokenizer


class _FastTokenizer(BaseTokenizer):
    """Common to the kinds backed by the ``tokenizers`` library (Rust, batch encoding in its own threads)."""

    tok = None  # tokenizers.Tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:  # noqa: ARG002
        # tokenizers parallelises a batch over its own thread pool (RAYON_NUM_THREADS), not num_threads
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def encode_long(self, text: str, dtype) -> np.ndarray:
        # GPT-2 / Llama-3 regexes end a pre-token at a newline followed by a non-space, and nothing merges
        # across pre-tokens: encode is additive there; the post-processor's specials go around the whole
        plan = self._long_plan()
        if plan is None:
            return super().encode_long(text, dtype)
        prefix, suffix = plan
        parts = [np.asarray(prefix, dtype)]
        parts += [np.asarray(self.tok.encode(p, add_special_tokens=False).ids, dtype)
                  for p in _cuts(text, newline_first=False)]
        parts.append(np.asarray(suffix, dtype))
        return np.concatenate(parts)

    def _long_plan(self):
        if not hasattr(self, "_plan"):
            self._plan = None
            spec = json.loads(self.tok.to_str())
            pre = spec.get("pre_tokenizer") or {}
            steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
            ok = spec.get("normalizer") is None and bool(steps) and all(_additive_step(s) for s in steps)
            ok = ok and not any("\n" in t.content for t in self.tok.get_added_tokens_decoder().values())
            if ok:
                probe = "x"
                inner = self.tok.encode(probe, add_special_tokens=False).ids
                full = self.tok.encode(probe).ids
                at = next((i for i in range(len(full) - len(inner) + 1) if full[i:i + len(inner)] == inner), None)
                if at is not None:
                    self._plan = (full[:at], full[at + len(inner):])
        return self._plan

    def id_to_piece(self, i: int) -> str:
        p = self.tok.id_to_token(int(i))
        return "" if p is None else p

    def _id(self, token) -> Optional[int]:
        if token is None:
            return None
        if isinstance(token, dict):  # tokenizer_config.json may spell an AddedToken as a dict
            token = token.get("content")
        i = self.tok.token_to_id(token) if isinstance(token, str) else None
        return None if i is None else int(i)


class HFTokenizer(_FastTokenizer):
    """A Hugging Face ``tokenizer.json`` (file or directory), encoded as ``AutoTokenizer(dir)(text).input_ids``.

    Like Megatron-LM's HuggingFaceTokenizer: the post-processor's special tokens (a Llama-3 ``<|begin_of_text|>``)
    are part of each document; special names come from tokenizer_config.json / special_tokens_map.json, with
    eos<->sep and bos<->cls standing in for each other. A bare tokenizer.json names no eos: a special token
    spelled ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>`` or ``<eos>`` is taken as eod.
    """

    kind = "huggingface"

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _Tok

        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise DataError(f"tokenizer not found: {file} (a Hugging Face tokenizer.json or a directory holding one)")
        try:
            self.tok = _Tok.from_file(file)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception with serde's text
            raise DataError(f"{file} is not a valid Hugging Face tokenizer.json ({e})") from None
        self.model_path = file
        self.dir = os.path.dirname(os.path.abspath(file))
        names = _special_names(self.dir)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.unk, self.pad, self.mask = (self._id(names.get(k)) for k in ("unk_token", "pad_token", "mask_token"))
        eos, sep = self._id(names.get("eos_token")), self._id(names.get("sep_token"))
        bos, cls = self._id(names.get("bos_token")), self._id(names.get("cls_token"))
        if eos is None and sep is None and not names:
            specials = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
            eos = next((self._id(n) for n in ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>") if n in specials),
                       None)
        self.eos, self.sep = (eos if eos is not None else sep), (sep if sep is not None else eos)
        self.bos, self.cls = (bos if bos is not None else cls), (cls if cls is not None else bos)
        self._word_start = None

    def files(self) -> dict[str, str]:
        out = {"tokenizer.json": self.model_path}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            p = os.path.join(self.dir, name)
            if os.path.isfile(p) and os.path.basename(self.model_path) == "tokenizer.json":
                out[name] = p
        return out


class GPT2BPETokenizer(_FastTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt`` (Megatron-LM's GPT2BPETokenizer: HF's GPT-2
    tokenizer over those files); eod = ``<|endoftext|>``, which is also a special token in text."""

    kind = "gpt2bpe"

    def __init__(self, vocab_file: str, merges_file: Optional[str] = None) -> None:
        from tokenizers import AddedToken, Tokenizer as _Tok, decoders, pre_tokenizers
        from tokenizers.models import BPE

        vocab_file = os.fspath(vocab_file)
        if os.path.isdir(vocab_file):
            vocab_file = os.path.join(vocab_file, "vocab.json")
        merges_file = merges_file or os.path.join(os.path.dirname(os.path.abspath(vocab_file)), "merges.txt")
        for p, what in ((vocab_file, "vocab.json"), (merges_file, "merges.txt")):
            if not os.path.isfile(p):
                raise DataError(f"GPT-2 BPE tokenizer: {what} not found at {p} (give --vocab-file/--merge-file, "
                                "or a directory holding vocab.json and merges.txt)")
        try:
            vocab, merges = BPE.read_file(vocab_file, merges_file)
        except Exception as e:  # noqa: BLE001 - tokenizers' errors are bare Exceptions
            raise DataError(f"GPT-2 BPE files {vocab_file} / {merges_file} do not parse ({e})") from None
        self.tok = _Tok(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()
        self.tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
        self.model_path, self.merges_path = vocab_file, merges_file
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos = self.bos = self.unk = self.sep = self.cls = self._id(ENDOFTEXT)
        self._word_start = None

    def files(self) -> dict[str, str]:
        return {"vocab.json": self.model_path, "merges.txt": self.merges_path}


LONG_PIECE_CHARS = 1 << 20
# pre-tokenizer regexes after which "\n" + a non-space always starts a new pre-token (GPT-2's, Llama-3's)
_ADDITIVE_SPLITS = {
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _additive_step(step: dict) -> bool:
    if step.get("type") == "ByteLevel":
        return not step.get("add_prefix_space", False)
    if step.get("type") == "Split":
        return step.get("pattern", {}).get("Regex") in _ADDITIVE_SPLITS and step.get("behavior") == "Isolated"
    return False


def _cuts(text: str, newline_first: bool, size: Optional[int] = None):
    """Pieces of ``text`` of about ``size`` characters, cut at a newline: each piece after the first starts
    with the newline (``newline_first``) or with the non-space character after it."""
    size = size or LONG_PIECE_CHARS
    pos, n = 0, len(text)
    while n - pos > size:
        k = text.find("\n", pos + size)
        if not newline_first:
            while k >= 0 and (k + 1 >= n or text[k + 1].isspace()):
                k = text.find("\n", k + 1)
            k = k + 1 if k >= 0 else -1
        if k < 0:
            break
        yield text[pos:k]
        pos = k
    yield text[pos:]


def _special_names(d: str) -> dict:
    """bos/eos/... token names from tokenizer_config.json, then special_tokens_map.json, like transformers."""
    out: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(d, name)
        if not os.path.isfile(p):
            continue
        try:
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as e:
            raise DataError(f"{p} is not valid JSON ({e})") from None
        for k in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "cls_token", "sep_token"):
            if data.get(k) is not None:
                out[k] = data[k]
    return out


def detect_kind(path: str) -> str:
    """The tokenizer kind a path holds: .model, tokenizer.json (file or in the dir), vocab.json (+ merges.txt)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "tokenizer.json")):
            return "huggingface"
        if os.path.isfile(os.path.join(p, "vocab.json")):
            return "gpt2bpe"
        if os.path.isfile(os.path.join(p, "tokenizer.model")):
            return "sentencepiece"
        raise DataError(f"tokenizer directory {p} holds no tokenizer.json, vocab.json + merges.txt or "
                        "tokenizer.model")
    if p.endswith(".json") and os.path.basename(p) == "vocab.json":
        return "gpt2bpe"
    if p.endswith(".json"):
        return "huggingface"
    return "sentencepiece"


def load_tokenizer(path: str, kind: Optional[str] = None, merges_file: Optional[str] = None) -> BaseTokenizer:
    """Load any supported tokenizer; ``kind`` (one of KINDS or a Megatron --tokenizer-type) overrides detection."""
    if not path:
        raise DataError("no tokenizer given: a SentencePiece .model, a tokenizer.json (or its directory), "
                        "or GPT-2 vocab.json + merges.txt")
    kind = MEGATRON_TYPES.get(kind, kind) if kind else detect_kind(path)
    if kind == "sentencepiece":
        p = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        return SentencePieceTokenizer(p)
    if kind == "huggingface":
        return HFTokenizer(path)
    if kind == "gpt2bpe":
        return GPT2BPETokenizer(path, merges_file)
    raise DataError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)} "
                    f"or a Megatron type ({', '.join(MEGATRON_TYPES)})")


def _nonneg(i: int) -> Optional[int]:
    return int(i) if i >= 0 else None


def tokenizer_files(path: str) -> dict[str, str]:
    """{file name: source} that carry the tokenizer at ``path`` (for checkpoints), without loading it."""
    kind = detect_kind(path)
    if kind == "sentencepiece":
        return {"tokenizer.model": os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path}
    if kind == "gpt2bpe":
        vocab = os.path.join(path, "vocab.json") if os.path.isdir(path) else path
        return {"vocab.json": vocab, "merges.txt": os.path.join(os.path.dirname(os.path.abspath(vocab)), "merges.txt")}
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    out = {"tokenizer.json": file}
    d = os.path.dirname(os.path.abspath(file))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(d, name)):
            out[name] = os.path.join(d, name)
    return out


def copy_tokenizer(path: str, dest_dir: str) -> None:
    """Copy the files of the tokenizer at ``path`` into ``dest_dir`` (a checkpoint's megalm/ directory)."""
    import shutil

    for name, src in tokenizer_files(path).items():
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dest_dir, name))


def saved_tokenizer(d: str) -> Optional[str]:
    """The tokenizer path ``copy_tokenizer`` left in ``d``, or None."""
    for name in ("tokenizer.json", "vocab.json", "tokenizer.model"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    return None
