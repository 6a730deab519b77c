"""Megatron MMIDIDX ``.bin/.idx`` datasets: a streaming writer and a validated memory-mapped reader.

Files written here are byte-identical to Megatron-LM's; files written by
Megatron-LM or GPT-NeoX read unchanged. The layout (all little-endian, packed):
``MMIDIDX\\x00\\x00`` | <Q version=1 | <B dtype code | <Q sequence count | <Q document count
| int32 lengths | int64 byte pointers | int64 document indices (starts 0, ends at sequence count).
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from megalm.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # 34

# Megatron-LM's codes. GPT-NeoX swaps 6 and 7; the reader resolves that by the .bin size.
CODE_TO_DTYPE = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}
DTYPE_TO_CODE = {np.dtype(v): k for k, v in CODE_TO_DTYPE.items()}


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """Megatron's choice: uint16 when every id fits below 65500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_file(prefix: str) -> str:
    return prefix + ".bin"


def index_file(prefix: str) -> str:
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(data_file(prefix)) and os.path.isfile(index_file(prefix))


def _map(path: str) -> Union[mmap.mmap, bytes]:
    size = os.path.getsize(path)
    if size == 0:
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """Read-only view of ``prefix.bin/.idx``; O(1) access to any sequence or slice of one.

    ``ds[i]`` is a read-only numpy view into the mapped ``.bin`` (no copy);
    ``len(ds)`` counts sequences; documents are ranges of sequences given by
    ``document_indices``.
    """

    def __init__(self, prefix: str) -> None:
        self.path_prefix = os.fspath(prefix)
        idx_path, bin_path = index_file(self.path_prefix), data_file(self.path_prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DataError(f"indexed dataset file not found: {p} (expected {self.path_prefix}.bin and .idx)")
        self._idx_buf = _map(idx_path)
        buf = self._idx_buf
        size = len(buf)
        if size < HEADER_SIZE:
            raise DataError(f"{idx_path}: truncated header ({size} bytes, expected at least {HEADER_SIZE})")
        magic = bytes(buf[:9])
        if magic != MAGIC:
            hint = " (legacy TNTIDX non-mmap format is not supported)" if magic.startswith(b"TNTIDX") else ""
            raise DataError(f"{idx_path}: bad magic {magic!r}, expected {MAGIC!r}{hint}")
        (version,) = struct.unpack_from("<Q", buf, 9)
        if version != VERSION:
            raise DataError(f"{idx_path}: unsupported version {version}, expected {VERSION}")
        (code,) = struct.unpack_from("<B", buf, 17)
        if code not in CODE_TO_DTYPE:
            raise DataError(f"{idx_path}: unknown dtype code {code}, expected one of {sorted(CODE_TO_DTYPE)}")
        n_seq, n_doc = struct.unpack_from("<QQ", buf, 18)
        expected = HEADER_SIZE + n_seq * (4 + 8) + n_doc * 8
        if size not in (expected, expected + n_seq):  # + n_seq: Megatron's optional multimodal modes
            raise DataError(
                f"{idx_path}: size {size} bytes does not match its header "
                f"({n_seq} sequences, {n_doc} documents need {expected} bytes); the file is truncated or corrupt"
            )
        if n_doc < 1:
            raise DataError(f"{idx_path}: document count is 0, expected at least 1 (the leading 0)")
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, np.int32, n_seq, off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(buf, np.int64, n_seq, off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(buf, np.int64, n_doc, off)
        off += 8 * n_doc
        self.sequence_modes = np.frombuffer(buf, np.int8, n_seq, off) if size > expected else None

        bin_size = os.path.getsize(bin_path)
        self.dtype = np.dtype(self._resolve_dtype(code, n_seq, bin_size))
        self.dtype_code = code
        self._validate(bin_size, idx_path, bin_path)
        self._bin_buf = _map(bin_path)
        self._tokens = np.frombuffer(self._bin_buf, self.dtype) if bin_size else np.empty(0, self.dtype)

    def _resolve_dtype(self, code: int, n_seq: int, bin_size: int) -> type:
        dtype = CODE_TO_DTYPE[code]
        if code in (6, 7) and n_seq:
            # NeoX wrote float32 as 6 and float64 as 7: trust the .bin size over the code.
            total = int(self.sequence_lengths.sum(dtype=np.int64))
            if total and bin_size == total * 4:
                return np.float32
            if total and bin_size == total * 8:
                return np.float64
        return dtype

    def _validate(self, bin_size: int, idx_path: str, bin_path: str) -> None:
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        n = len(lengths)
        if docs[0] != 0 and n:
            raise DataError(f"{idx_path}: document_indices[0] is {docs[0]}, expected 0")
        if docs[-1] != n:
            raise DataError(
                f"{idx_path}: last document index is {docs[-1]}, expected the sequence count {n}; the index is corrupt"
            )
        if len(docs) > 1 and np.any(np.diff(docs) < 0):
            raise DataError(f"{idx_path}: document_indices are not non-decreasing; the index is corrupt")
        if n == 0:
            return
        if lengths.min() < 0:
            raise DataError(f"{idx_path}: negative sequence length at sequence {int(np.argmin(lengths))}")
        item = self.dtype.itemsize
        end = int(pointers[-1]) + int(lengths[-1]) * item
        if pointers[0] != 0 or end != bin_size:
            raise DataError(
                f"{bin_path}: size {bin_size} bytes, but {idx_path} describes {end} bytes of {self.dtype} tokens "
                f"(first pointer {int(pointers[0])}); the .bin is truncated or does not belong to this .idx"
            )
        # pointers must be the running sum of lengths: checked in chunks to keep memory flat
        step = 1 << 22
        prev = 0
        for s in range(0, n, step):
            ln = lengths[s:s + step].astype(np.int64) * item
            expect = np.cumsum(ln) - ln + prev
            if not np.array_equal(expect, pointers[s:s + step]):
                bad = s + int(np.argmax(expect != pointers[s:s + step]))
                raise DataError(f"{idx_path}: sequence pointer {bad} is inconsistent with the lengths; the index is corrupt")
            prev = int(expect[-1] + ln[-1])

    def __getstate__(self) -> dict:
        # mapped files are reopened by path in the receiving process (DataLoader workers under spawn)
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path_prefix"])

    def fingerprint(self) -> str:
        """XXH3-128 of the whole .idx (sizes, pointers, document boundaries: everything an index cache depends on)
        plus its size; computed once per open. Every rank computes it at start-up, so it must be cheap at scale:
        ~26 GB/s on one core here (SHA-256, used before, ran at ~1.9 GB/s; a .idx is ~20 bytes per document,
        so ~1 GB for 50M documents). Not a defence against a hostile file: it keys a cache."""
        fp = getattr(self, "_fingerprint", None)
        if fp is None:
            import xxhash

            h = xxhash.xxh3_128()
            buf = memoryview(self._idx_buf)
            step = 64 << 20
            for off in range(0, len(buf), step):
                h.update(buf[off:off + step])
            fp = self._fingerprint = f"{len(buf)}:xxh3:{h.hexdigest()}"
        return fp

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(len(self._tokens))

    def _check(self, i: int) -> int:
        n = len(self.sequence_lengths)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.path_prefix} ({n} sequences)")
        return i

    def __getitem__(self, i: Union[int, slice]) -> Union[np.ndarray, list]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = self._check(int(i))
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence ``i`` (to its end when length is None)."""
        i = self._check(int(i))
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}, {offset + length}) out of range for sequence {i} of length {size}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start:start + length]

    def document(self, d: int) -> np.ndarray:
        """All tokens of document ``d`` (its sequences concatenated: a view, they are contiguous)."""
        b, e = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if e == b:
            return self._tokens[:0]
        start = int(self.sequence_pointers[b]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sequence_lengths[b:e].sum())]

    @property
    def tokens(self) -> np.ndarray:
        """The whole ``.bin`` as one flat array (a view)."""
        return self._tokens

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.path_prefix!r}, {len(self)} sequences, "
                f"{self.num_documents} documents, {self.dtype})")


class IndexedDatasetWriter:
    """Stream sequences into ``prefix.bin/.idx``; nothing appears under the final names until ``finalize``.

    Lengths and document boundaries are spilled to side files in chunks, so
    memory stays flat however many documents are written. Use as a context
    manager: an exception removes the temporary files and leaves any existing
    dataset untouched.
    """

    _CHUNK = 1 << 16

    def __init__(self, prefix: str, dtype: Union[type, np.dtype] = np.uint16) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_TO_CODE:
            raise DataError(f"unsupported token dtype {self.dtype} for {self.prefix}; "
                            f"expected one of {sorted(str(d) for d in DTYPE_TO_CODE)}")
        d = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(d, exist_ok=True)
        tag = f".tmp.{os.getpid()}.{id(self):x}"
        self._bin_tmp = data_file(self.prefix) + tag
        self._len_tmp = self.prefix + ".lengths" + tag
        self._doc_tmp = self.prefix + ".docs" + tag
        self._bin = open(self._bin_tmp, "wb")
        self._lenf = open(self._len_tmp, "wb")
        self._docf = open(self._doc_tmp, "wb")
        self._lens: list[np.ndarray] = []
        self._docs: list[np.ndarray] = []
        self._pending = 0
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._docs.append(np.zeros(1, np.int64))
        self._closed = False

    # ------------------------------------------------------------------ adding
    def add_sequence(self, tokens: Union[Sequence[int], np.ndarray]) -> None:
        """One sequence (e.g. a sentence); call ``end_document`` after a document's last one."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._push_lengths(np.array([arr.size], np.int32))

    add_item = add_sequence  # Megatron's name

    def end_document(self) -> None:
        self.num_documents += 1
        self._docs.append(np.array([self.num_sequences], np.int64))
        self._maybe_flush(1)

    def add_document(self, tokens: Union[Sequence[int], np.ndarray], lengths: Optional[Sequence[int]] = None) -> None:
        """A whole document: ``tokens`` split into sequences of ``lengths`` (default: one sequence)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        lens = np.array([arr.size] if lengths is None else lengths, dtype=np.int32)
        if int(lens.sum()) != arr.size:
            raise DataError(f"{self.prefix}: sequence lengths sum to {int(lens.sum())} but the document has {arr.size} tokens")
        self._bin.write(arr.tobytes(order="C"))
        self._push_lengths(lens)
        self.end_document()

    def add_batch(self, tokens: np.ndarray, seq_lengths: np.ndarray, seqs_per_doc: np.ndarray) -> None:
        """Many documents at once (the preprocess fast path): flat tokens, per-sequence lengths, per-document counts."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        seq_lengths = np.asarray(seq_lengths, np.int32)
        seqs_per_doc = np.asarray(seqs_per_doc, np.int64)
        self._bin.write(memoryview(tokens).cast("B"))
        base = self.num_sequences
        self._push_lengths(seq_lengths)
        if len(seqs_per_doc):
            self._docs.append(base + np.cumsum(seqs_per_doc))
            self.num_documents += len(seqs_per_doc)
            self._maybe_flush(len(seqs_per_doc))

    def _push_lengths(self, lens: np.ndarray) -> None:
        if len(lens):
            self._lens.append(lens)
            self.num_sequences += len(lens)
            self.num_tokens += int(lens.sum(dtype=np.int64))
            self._maybe_flush(len(lens))

    def _maybe_flush(self, n: int, force: bool = False) -> None:
        self._pending += n
        if self._pending >= self._CHUNK or force:
            for a in self._lens:
                self._lenf.write(a.tobytes())
            for a in self._docs:
                self._docf.write(a.tobytes())
            self._lens, self._docs, self._pending = [], [], 0

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (merge shards): copies its ``.bin`` bytes, offsets its index."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DataError(f"cannot merge {prefix} ({other.dtype}) into {self.prefix} ({self.dtype}): dtypes differ")
        self._bin.flush()
        with open(data_file(prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, 16 << 20)
        base = self.num_sequences
        step = 1 << 22
        for s in range(0, len(other), step):
            self._push_lengths(np.array(other.sequence_lengths[s:s + step]))
        docs = other.document_indices
        for s in range(1, len(docs), step):
            chunk = docs[s:s + step] + base
            self._docs.append(np.array(chunk, np.int64))
            self._maybe_flush(len(chunk))
        self.num_documents += len(docs) - 1

    # ------------------------------------------------------------------ finishing
    def finalize(self) -> None:
        """Write the ``.idx`` and move both files to their final names (bin first, then idx)."""
        if self._closed:
            raise DataError(f"{self.prefix}: writer already finalized")
        self._maybe_flush(0, force=True)
        for f in (self._bin, self._lenf, self._docf):
            f.close()
        idx_tmp = index_file(self.prefix) + f".tmp.{os.getpid()}.{id(self):x}"
        try:
            n, nd = self.num_sequences, self.num_documents + 1
            item = self.dtype.itemsize
            with open(idx_tmp, "wb") as out:
                out.write(MAGIC)
                out.write(struct.pack("<Q", VERSION))
                out.write(struct.pack("<B", DTYPE_TO_CODE[self.dtype]))
                out.write(struct.pack("<Q", n))
                out.write(struct.pack("<Q", nd))
                lens = np.fromfile(self._len_tmp, np.int32) if n else np.empty(0, np.int32)
                # chunks keep memory flat; fromfile with offset would too, but lengths are 4 bytes/seq
                step = 1 << 22
                for s in range(0, n, step):
                    out.write(lens[s:s + step].tobytes())
                prev = 0
                for s in range(0, n, step):
                    ln = lens[s:s + step].astype(np.int64) * item
                    ptr = np.cumsum(ln) - ln + prev
                    out.write(ptr.tobytes())
                    prev = int(ptr[-1] + ln[-1])
                del lens
                with open(self._doc_tmp, "rb") as docs:
                    shutil.copyfileobj(docs, out, 16 << 20)
            os.replace(self._bin_tmp, data_file(self.prefix))
            os.replace(idx_tmp, index_file(self.prefix))
        finally:
            for p in (idx_tmp, self._len_tmp, self._doc_tmp):
                if os.path.exists(p):
                    os.remove(p)
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far; an existing dataset under ``prefix`` is untouched."""
        if self._closed:
            return
        for f in (self._bin, self._lenf, self._docf):
            f.close()
        for p in (self._bin_tmp, self._len_tmp, self._doc_tmp):
            if os.path.exists(p):
                os.remove(p)
        self._closed = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()


def write_dataset(prefix: str, documents: Iterable[Sequence[int]], dtype: Union[type, np.dtype] = np.uint16) -> None:
    """Convenience: one sequence per document."""
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in documents:
            w.add_document(doc)
