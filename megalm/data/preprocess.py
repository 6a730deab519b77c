"""``megalm preprocess``: JSONL -> Megatron ``{prefix}_{key}_{document|sentence}.bin/.idx``, streaming.

Output is byte-identical to Megatron-LM's ``tools/preprocess_data.py`` with a
SentencePiece model and ``--append-eod`` (each document is
``sp.encode(text)`` + eos; uint16 ids when the vocabulary is < 65500). The
main process reads byte chunks and writes results in input order; worker
processes parse, clean and encode whole chunks and return flat numpy arrays,
so memory is bounded by the chunks in flight, not by the corpus. Bad lines
are skipped and reported by file and line (``--strict`` stops at the first).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megalm.data.clean import CleanOptions, clean_text, length_filter
from megalm.data.indexed import IndexedDatasetWriter, optimal_dtype
from megalm.data.jsonl import expand_inputs, open_binary
from megalm.data.progress import Progress
from megalm.errors import DataError

log = logging.getLogger(__name__)

REASONS = {
    "malformed_json": "malformed JSON",
    "invalid_utf8": "invalid UTF-8",
    "not_an_object": "line is not a JSON object",
    "missing_key": "missing key",
    "non_string": "value is not a string (or list of strings)",
    "invalid_unicode": "text has unencodable characters (lone surrogates)",
    "empty": "empty document (no tokens)",
    "too_short": "shorter than --min-chars",
    "too_long": "longer than --max-chars",
    "duplicate": "exact duplicate of an earlier document",
}
# reasons that are about malformed input, as opposed to filters the user asked for
INPUT_ERRORS = ("malformed_json", "invalid_utf8", "not_an_object", "missing_key", "non_string", "invalid_unicode",
                "empty")


@dataclass(frozen=True)
class Options:
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    split_sentences: bool = False
    keep_newlines: bool = False
    lang: str = "english"
    clean: CleanOptions = field(default_factory=CleanOptions)
    drop_empty: bool = False


@dataclass
class Summary:
    """What a run did; ``outputs`` maps each json key to its dataset prefix."""

    outputs: dict[str, str]
    lines: int = 0
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    input_bytes: int = 0
    blank_lines: int = 0
    seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=collections.Counter)
    examples: list[tuple[str, int, str, str]] = field(default_factory=list)  # (file, line, reason, detail)

    def format(self) -> str:
        dt = max(self.seconds, 1e-9)
        rows = [
            f"wrote {', '.join(p + '.bin/.idx' for p in self.outputs.values())}",
            f"  {self.documents:,} documents, {self.sequences:,} sequences, {self.tokens:,} tokens "
            f"from {self.lines:,} lines ({self.input_bytes / 1e6:,.1f} MB) in {self.seconds:.1f}s "
            f"({self.lines / dt:,.0f} docs/s, {self.input_bytes / dt / 1e6:,.1f} MB/s)",
        ]
        if self.blank_lines:
            rows.append(f"  skipped {self.blank_lines:,} blank lines")
        for reason, n in sorted(self.dropped.items()):
            if not n:
                continue
            if reason == "empty" and self._empty_kept:
                rows.append(f"  {n:,} empty documents: no tokens written; each kept as a zero-length document "
                            f"entry as Megatron-LM does (--drop-empty omits them)")
            else:
                rows.append(f"  dropped {n:,} lines: {REASONS[reason]}")
        return "\n".join(rows)

    _empty_kept: bool = True


# ---------------------------------------------------------------- the worker side

_W: dict[str, Any] = {}


def _init_worker(model_path: str, opts: Options, dtype: str) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(model_path)
    _W.update(sp=sp, opts=opts, dtype=np.dtype(dtype), eod=sp.eos_id(), splitter=None)
    if opts.split_sentences:
        from megalm.data.sentences import make_splitter

        _W["splitter"] = make_splitter(opts.keep_newlines, opts.lang)


def _parse_line(line: bytes, opts: Options, splitter) -> tuple[Optional[dict], Optional[str], str]:
    """(sentences per key, None, "") for a good line, or (None, reason, detail)."""
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        return None, "invalid_utf8", f"byte {e.start}: {e.reason}"
    except ValueError as e:
        return None, "malformed_json", str(e)
    if not isinstance(obj, dict):
        return None, "not_an_object", f"got {type(obj).__name__}"
    out = {}
    for key in opts.json_keys:
        if key not in obj:
            return None, "missing_key", f"no key '{key}' (keys: {', '.join(list(obj)[:5])})"
        value = obj[key]
        if isinstance(value, str):
            if opts.clean.transforms:
                value = clean_text(value, opts.clean)
            out[key] = splitter(value) if splitter else [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = [clean_text(v, opts.clean) for v in value] if opts.clean.transforms else value
        else:
            return None, "non_string", f"'{key}' is {type(value).__name__}"
    return out, None, ""


def _doc_hash(doc: dict) -> int:
    h = hashlib.blake2b(digest_size=8)
    for key in sorted(doc):
        for s in doc[key]:
            h.update(s.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        h.update(b"\x01")
    return int.from_bytes(h.digest(), "little")


def _encodable(doc: dict) -> bool:
    try:
        for sents in doc.values():
            for s in sents:
                s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _pack(ids: list, doc_of: np.ndarray, n_docs: int, eod: Optional[int], dtype: np.dtype):
    """Flat tokens, per-sequence lengths and per-document sequence counts (empty sentences dropped)."""
    lens = np.fromiter(map(len, ids), np.int64, count=len(ids))
    total = int(lens.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=total)
    keep = lens > 0
    lens, doc_of = lens[keep], doc_of[keep]
    seqs_per_doc = np.bincount(doc_of, minlength=n_docs).astype(np.int64)
    if eod is not None and len(lens):
        last_seq = np.cumsum(seqs_per_doc)[seqs_per_doc > 0] - 1  # the last sequence of each non-empty doc
        ends = np.cumsum(lens)[last_seq]  # token position after each such doc
        tokens = np.insert(tokens, ends, np.array(eod, dtype=dtype))
        lens[last_seq] += 1
    return tokens, lens.astype(np.int32), seqs_per_doc


def encode_chunk(task: tuple[int, int, bytes]) -> dict:
    """Parse, clean, filter and encode one chunk of JSONL lines (runs in a worker)."""
    file_index, first_line, blob = task
    opts: Options = _W["opts"]
    sp, splitter = _W["sp"], _W["splitter"]
    lines = blob.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    docs: list[dict] = []
    line_nos: list[int] = []
    bad: list[tuple[int, str, str]] = []
    blank = 0
    for i, line in enumerate(lines):
        if not line.strip():
            blank += 1
            continue
        doc, reason, detail = _parse_line(line, opts, splitter)
        if doc is None:
            bad.append((first_line + i, reason, detail))
            continue
        if opts.clean.min_chars or opts.clean.max_chars is not None:
            reason = length_filter("".join(s for v in doc.values() for s in v), opts.clean)
            if reason:
                bad.append((first_line + i, reason, ""))
                continue
        docs.append(doc)
        line_nos.append(first_line + i)

    keys = opts.json_keys
    out: dict[str, Any] = {}
    while True:
        try:
            for key in keys:
                texts, doc_of = [], []
                for d, doc in enumerate(docs):
                    texts.extend(doc[key])
                    doc_of.extend([d] * len(doc[key]))
                ids = sp.encode(texts, out_type=int, num_threads=1) if texts else []
                out[key] = _pack(ids, np.array(doc_of, np.int64), len(docs),
                                 _W["eod"] if opts.append_eod else None, _W["dtype"])
            break
        except (UnicodeEncodeError, RuntimeError, TypeError, SystemError):
            # one unencodable document fails the whole batch: find it, drop it, retry
            ok = [_encodable(d) for d in docs]
            if all(ok):
                raise
            bad.extend((ln, "invalid_unicode", "lone surrogate") for ln, good in zip(line_nos, ok) if not good)
            docs = [d for d, good in zip(docs, ok) if good]
            line_nos = [ln for ln, good in zip(line_nos, ok) if good]
            out = {}
    # a document is empty when it has no sequences under any key
    empty = np.ones(len(docs), bool)
    for key in keys:
        empty &= out[key][2] == 0
    bad.extend((line_nos[d], "empty", "") for d in np.flatnonzero(empty))
    hashes = np.array([_doc_hash(d) for d in docs], np.uint64) if opts.clean.dedup else None
    return {
        "file": file_index, "lines": len(lines), "bytes": len(blob), "blank": blank,
        "bad": sorted(bad), "arrays": out, "empty": empty, "hashes": hashes, "line_nos": line_nos,
    }


# ---------------------------------------------------------------- the main process side

def _chunks(files: Sequence[str], chunk_bytes: int, pos: list) -> Iterator[tuple[int, int, bytes]]:
    """(file index, first line number, whole lines) in input order; ``pos[0]`` tracks bytes read on disk."""
    done = 0
    for fi, path in enumerate(files):
        f = open_binary(path)
        raw = getattr(f, "fileobj", None) or f
        line = 1
        try:
            while True:
                blob = f.read(chunk_bytes)
                if not blob:
                    break
                if not blob.endswith(b"\n"):
                    blob += f.readline()
                pos[0] = done + raw.tell()
                yield fi, line, blob
                line += blob.count(b"\n")
        finally:
            f.close()
        done += os.path.getsize(path)
        pos[0] = done


def _filter_docs(arrays: tuple, keep: np.ndarray) -> tuple:
    tokens, lens, seqs = arrays
    seq_keep = np.repeat(keep, seqs)
    tok_keep = np.repeat(seq_keep, lens)
    return tokens[tok_keep], lens[seq_keep], seqs[keep]


def output_prefixes(output_prefix: str, keys: Sequence[str], split_sentences: bool) -> dict[str, str]:
    level = "sentence" if split_sentences else "document"
    return {k: f"{output_prefix}_{k}_{level}" for k in keys}


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_model: str,
    opts: Options = Options(),
    workers: int = 1,
    strict: bool = False,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
    max_reported: int = 20,
) -> Summary:
    """Tokenize ``inputs`` into indexed datasets; returns what was written and skipped."""
    from megalm.data.tokenizer import Tokenizer

    t0 = time.time()
    files = expand_inputs(inputs)
    tok = Tokenizer(tokenizer_model)
    if opts.append_eod and tok.eod is None:
        raise DataError(f"--append-eod: tokenizer {tokenizer_model} has no eos piece to use as end-of-document")
    dtype = np.dtype(optimal_dtype(tok.vocab_size))
    prefixes = output_prefixes(output_prefix, opts.json_keys, opts.split_sentences)
    summary = Summary(outputs=prefixes)
    summary._empty_kept = not opts.drop_empty
    seen: set[int] = set()
    pos = [0]
    bar = Progress(sum(os.path.getsize(f) for f in files), enabled=progress)
    writers = {k: IndexedDatasetWriter(p, dtype) for k, p in prefixes.items()}
    pool = None
    try:
        args = (tok.model_path, opts, dtype.str)
        if workers > 0:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=args)
            results = _ordered(pool, _chunks(files, chunk_bytes, pos), window=2 * workers + 1)
        else:
            _init_worker(*args)
            results = map(encode_chunk, _chunks(files, chunk_bytes, pos))
        for res in results:
            _consume(res, files, writers, summary, seen, opts, strict, max_reported)
            bar.update(summary.lines, summary.input_bytes, pos[0])
        bar.update(summary.lines, summary.input_bytes, pos[0], force=True)
        bar.close()
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    first = writers[opts.json_keys[0]]
    summary.documents, summary.sequences = first.num_documents, first.num_sequences
    summary.tokens = sum(w.num_tokens for w in writers.values())
    summary.seconds = time.time() - t0
    return summary


def _ordered(pool, tasks: Iterator, window: int) -> Iterator[dict]:
    """Results in task order with at most ``window`` chunks in flight (Pool.imap would read ahead unboundedly)."""
    pending: collections.deque = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(encode_chunk, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _consume(res: dict, files: Sequence[str], writers: dict, summary: Summary, seen: set, opts: Options,
             strict: bool, max_reported: int) -> None:
    path = files[res["file"]]
    summary.lines += res["lines"] - res["blank"]
    summary.blank_lines += res["blank"]
    summary.input_bytes += res["bytes"]
    for line, reason, detail in res["bad"]:
        if strict:
            raise DataError(f"{path}:{line}: {REASONS[reason]}{': ' + detail if detail else ''} (--strict)")
        summary.dropped[reason] += 1
        if len(summary.examples) < max_reported:
            summary.examples.append((path, line, reason, detail))
        elif len(summary.examples) == max_reported:
            log.warning("further bad lines are counted but not listed")
        if len(summary.examples) <= max_reported:
            log.warning("%s:%d: %s: %s%s", path, line, "empty" if reason == "empty" else "skipped",
                        REASONS[reason], f" ({detail})" if detail else "")
    keep = None
    n_docs = len(res["line_nos"])
    if opts.drop_empty and res["empty"].any():
        keep = ~res["empty"]
    if res["hashes"] is not None:
        keep = np.ones(n_docs, bool) if keep is None else keep
        for d, h in enumerate(res["hashes"].tolist()):
            if not keep[d]:
                continue
            if h in seen:
                keep[d] = False
                summary.dropped["duplicate"] += 1
                if len(summary.examples) < max_reported:
                    summary.examples.append((path, res["line_nos"][d], "duplicate", ""))
            else:
                seen.add(h)
    for key, w in writers.items():
        arrays = res["arrays"][key]
        if keep is not None and not keep.all():
            arrays = _filter_docs(arrays, keep)
        w.add_batch(*arrays)


# ---------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalm preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", action="append", required=True,
                   help="JSONL (.jsonl or .jsonl.gz), glob or directory; repeatable; read in the order given")
    g.add_argument("--json-keys", nargs="+", default=["text"])
    g.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (BERT-pair data)")
    g.add_argument("--keep-newlines", action="store_true", help="with --split-sentences: keep newlines")
    g.add_argument("--lang", default="english", help="NLTK punkt language, when NLTK is installed")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", required=True, help="SentencePiece .model")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"],
                   help="accepted for Megatron-LM command-line compatibility; all mean SentencePiece")
    g.add_argument("--append-eod", action="store_true", help="append the model's eos id to each document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_{document|sentence}.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="encoding processes (0 = in this process)")
    g.add_argument("--chunk-mb", type=float, default=1.0, help="input read per task, in MB")
    g.add_argument("--partitions", type=int, default=1,
                   help="accepted for Megatron-LM compatibility; output and order are the same for any value "
                        "(parallelism comes from --workers; merge separately made shards with merge-datasets)")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="accepted for Megatron-LM compatibility; input order is always kept")
    g.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    g.add_argument("--max-reported", type=int, default=20, help="bad lines listed individually")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--log-interval", type=float, default=10.0, help="seconds between log lines when not on a terminal")
    g = p.add_argument_group("cleaning (all off by default; any of them changes the output vs Megatron-LM)")
    g.add_argument("--normalize", choices=["nfkc", "nfc"], default=None)
    g.add_argument("--strip-control", action="store_true", help="remove control characters except tab/newline")
    g.add_argument("--clean-whitespace", action="store_true",
                   help="CRLF->LF, trailing spaces, runs of inner spaces, 3+ newlines -> 2")
    g.add_argument("--min-chars", type=int, default=0)
    g.add_argument("--max-chars", type=int, default=None)
    g.add_argument("--dedup", action="store_true", help="drop exact duplicates (by content hash, after cleaning)")
    g.add_argument("--drop-empty", action="store_true",
                   help="omit documents with no tokens entirely (Megatron-LM keeps a zero-length document)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    clean = CleanOptions(normalize=args.normalize, strip_control=args.strip_control,
                         clean_whitespace=args.clean_whitespace, min_chars=args.min_chars,
                         max_chars=args.max_chars, dedup=args.dedup)
    opts = Options(json_keys=tuple(args.json_keys), append_eod=args.append_eod,
                   split_sentences=args.split_sentences, keep_newlines=args.keep_newlines, lang=args.lang,
                   clean=clean, drop_empty=args.drop_empty)
    if args.workers < 0:
        raise DataError(f"--workers must be >= 0, got {args.workers}")
    summary = preprocess(args.input, args.output_prefix, args.tokenizer_model, opts, workers=args.workers,
                         strict=args.strict, chunk_bytes=max(int(args.chunk_mb * (1 << 20)), 1 << 12),
                         progress=not args.no_progress, max_reported=args.max_reported)
    print(summary.format(), file=sys.stderr)
    return 0
