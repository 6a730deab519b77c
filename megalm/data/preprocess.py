"""``megalm preprocess``: JSONL -> Megatron ``{prefix}_{key}_{document|sentence}.bin/.idx``, streaming.

Output is byte-identical to Megatron-LM's ``tools/preprocess_data.py`` with
``--append-eod`` for a SentencePiece model, a Hugging Face tokenizer.json and
GPT-2 vocab.json + merges.txt (each document is ``tokenize(text)`` + eod;
uint16 ids when the vocabulary is < 65500). The main process reads byte
chunks and writes results in input order; worker processes (megalm.data.workers)
parse, clean and encode whole chunks and return flat numpy arrays, so memory
is bounded by the chunks in flight, not by the corpus. Bad lines are skipped
and reported by file and line (``--strict`` stops at the first).
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import itertools
import json
import logging
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megalm.data.clean import CleanOptions, clean_text, length_filter
from megalm.data.indexed import IndexedDatasetWriter, optimal_dtype
from megalm.data.jsonl import expand_inputs, open_binary
from megalm.data.progress import Progress
from megalm.data.tokenizer import MEGATRON_TYPES
from megalm.data.workers import WorkerPool
from megalm.errors import DataError

log = logging.getLogger(__name__)

REASONS = {
    "malformed_json": "malformed JSON",
    "invalid_utf8": "invalid UTF-8",
    "not_an_object": "line is not a JSON object",
    "too_deep": "JSON nested too deeply to parse",
    "too_big": "out of memory parsing or encoding this one document",
    "missing_key": "missing key",
    "non_string": "value is not a string (or list of strings)",
    "invalid_unicode": "text has unencodable characters (lone surrogates)",
    "empty": "empty document (no tokens)",
    "too_short": "shorter than --min-chars",
    "too_long": "longer than --max-chars",
    "duplicate": "exact duplicate of an earlier document",
}


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


def _init_worker(model_path: str, kind: str, merges: Optional[str], opts: Options, dtype: str,
                 threads: int = 0) -> None:
    from megalm.data.tokenizer import load_tokenizer

    if threads:  # tokenizers' Rust pool, sized before its first use in this process
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    tok = load_tokenizer(model_path, kind, merges)
    _W.update(tok=tok, opts=opts, dtype=np.dtype(dtype), eod=tok.eod, splitter=None)
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
    except RecursionError:
        return None, "too_deep", "exceeds Python's recursion limit"
    except MemoryError:
        return None, "too_big", f"{len(line):,} bytes"
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


# documents longer than this are encoded alone, in pieces (tokenizer.encode_long): bounded memory
LONG_DOC_CHARS = 1 << 22


def _encode(tok, texts: list, dtype) -> list:
    """Token ids per text: a batch for the usual documents, an array per very long one."""
    long = {i for i, t in enumerate(texts) if len(t) > LONG_DOC_CHARS}
    if not long:
        return tok.encode_batch(texts)
    short = iter(tok.encode_batch([t for i, t in enumerate(texts) if i not in long]))
    return [tok.encode_long(t, dtype) if i in long else next(short) for i, t in enumerate(texts)]


def _fits(tok, docs: list) -> list[bool]:
    """Which documents encode alone without a MemoryError (after a batch ran out of memory)."""
    ok = []
    for doc in docs:
        try:
            for sents in doc.values():
                tok.encode_batch(sents)
            ok.append(True)
        except MemoryError:
            ok.append(False)
    return ok


def _pack(ids: list, doc_of: np.ndarray, n_docs: int, eod: Optional[int], dtype: np.dtype):
    """Flat tokens, per-sequence lengths and per-document sequence counts (empty sentences dropped)."""
    lens = np.fromiter(map(len, ids), np.int64, count=len(ids))
    total = int(lens.sum())
    if any(isinstance(x, np.ndarray) for x in ids):  # a very long document came back as an array
        tokens = np.concatenate([np.asarray(x, dtype) for x in ids]) if ids else np.zeros(0, dtype)
    else:
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
    tok, splitter = _W["tok"], _W["splitter"]
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
    n_lines = len(lines)
    del lines  # the parsed documents are all that is needed now (a 200 MB line is held once, not twice)

    keys = opts.json_keys
    out: dict[str, Any] = {}
    while True:
        try:
            for key in keys:
                texts, doc_of = [], []
                for d, doc in enumerate(docs):
                    texts.extend(doc[key])
                    doc_of.extend([d] * len(doc[key]))
                ids = _encode(tok, texts, _W["dtype"]) if texts else []
                out[key] = _pack(ids, np.array(doc_of, np.int64), len(docs),
                                 _W["eod"] if opts.append_eod else None, _W["dtype"])
                del ids
            break
        except Exception as e:  # sentencepiece/tokenizers raise assorted types on bad text
            # one bad document fails the whole batch: find it, drop it, retry
            ok = [_encodable(d) for d in docs]
            reason, detail = "invalid_unicode", "lone surrogate"
            if all(ok) and isinstance(e, MemoryError):
                ok = _fits(tok, docs)
                reason, detail = "too_big", "out of memory encoding it"
            if all(ok):
                raise
            bad.extend((ln, reason, detail) for ln, good in zip(line_nos, ok) if not good)
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
        "file": file_index, "lines": n_lines, "bytes": len(blob), "blank": blank,
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
                try:
                    blob = f.read(chunk_bytes)
                    if blob and not blob.endswith(b"\n"):
                        blob += f.readline()
                except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                    raise DataError(f"{path}: corrupt or truncated gzip data after line {line - 1:,} ({e}); "
                                    "the lines before were read. Re-download or re-compress the file") from None
                if not blob:
                    break
                pos[0] = done + raw.tell()
                yield fi, line, blob
                line += blob.count(b"\n")
        finally:
            f.close()
        done += os.path.getsize(path)
        pos[0] = done


def _describe_chunk(files: Sequence[str], task: tuple[int, int, bytes]) -> str:
    fi, first, blob = task
    last = first + max(blob.count(b"\n"), 1) - 1
    return f"{files[fi]} lines {first:,}-{last:,}"


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
    tokenizer_type: Optional[str] = None,
    merges_file: Optional[str] = None,
) -> Summary:
    """Tokenize ``inputs`` into indexed datasets; returns what was written and skipped.

    ``tokenizer_model`` is a SentencePiece .model, a tokenizer.json (or its directory) or a GPT-2 vocab.json
    (``merges_file`` beside it by default); ``tokenizer_type`` (a kind or Megatron's --tokenizer-type) overrides
    detection from the path.
    """
    from megalm.data.tokenizer import load_tokenizer

    t0 = time.time()
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer_model, tokenizer_type, merges_file)
    if opts.append_eod and tok.eod is None:
        raise DataError(f"--append-eod: tokenizer {tokenizer_model} has no end-of-document token (SentencePiece: "
                        "an eos piece; tokenizer.json: an eos_token in tokenizer_config.json or a special "
                        "<|endoftext|>/</s>; GPT-2: <|endoftext|>)")
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
        merges = getattr(tok, "merges_path", None)
        if workers > 0:
            threads = max(1, (os.cpu_count() or 1) // workers)
            pool = WorkerPool(workers, encode_chunk, _init_worker, (tok.model_path, tok.kind, merges, opts,
                                                                   dtype.str, threads),
                              describe=functools.partial(_describe_chunk, files))
            results = pool.ordered(_chunks(files, chunk_bytes, pos), ahead=workers + 1)
        else:
            _init_worker(tok.model_path, tok.kind, merges, opts, dtype.str)
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
            pool.close()
    first = writers[opts.json_keys[0]]
    summary.documents, summary.sequences = first.num_documents, first.num_sequences
    summary.tokens = sum(w.num_tokens for w in writers.values())
    summary.seconds = time.time() - t0
    return summary


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
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model, or a Hugging Face tokenizer.json or the directory holding it")
    g.add_argument("--tokenizer-type", default=None, choices=list(MEGATRON_TYPES),
                   help="Megatron-LM's names; default: from the files given (SentencePiece types all mean "
                        "SentencePiece; GPT2BPETokenizer reads --vocab-file and --merge-file)")
    g.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT-2 BPE merges.txt (default: beside --vocab-file)")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document id to each document (eos; GPT-2: <|endoftext|>)")
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
    model = args.tokenizer_model
    if args.tokenizer_type == "GPT2BPETokenizer" or (args.vocab_file and not model):
        model = args.vocab_file or model  # --tokenizer-model may name vocab.json or its directory too
        if not model:
            raise DataError("--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file")
        args.vocab_file = model
    elif args.vocab_file or args.merge_file:
        raise DataError("--vocab-file/--merge-file are for --tokenizer-type GPT2BPETokenizer; "
                        "give a tokenizer.json or .model with --tokenizer-model")
    if not model:
        raise DataError("give --tokenizer-model (SentencePiece .model or tokenizer.json) or "
                        "--tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt")
    kind = "gpt2bpe" if model == args.vocab_file else args.tokenizer_type
    summary = preprocess(args.input, args.output_prefix, model, opts, workers=args.workers,
                         strict=args.strict, chunk_bytes=max(int(args.chunk_mb * (1 << 20)), 1 << 12),
                         progress=not args.no_progress, max_reported=args.max_reported,
                         tokenizer_type=kind, merges_file=args.merge_file)
    print(summary.format(), file=sys.stderr)
    return 0
