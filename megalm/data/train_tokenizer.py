"""``megalm train-tokenizer``: train a SentencePiece model from JSONL that keeps text exact.

Identity normalisation, no whitespace squeezing, byte fallback and split
digits make decode(encode(text)) == text for code, newlines and indentation;
the special pieces the objectives need get fixed ids (see tokenizer.py).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import time
from typing import Iterator, Optional, Sequence

from megalm.data.jsonl import expand_inputs, iter_texts
from megalm.data.tokenizer import BOS, CLS, EOS, MASK, PAD, SEP, UNK, Tokenizer
from megalm.errors import DataError

log = logging.getLogger(__name__)

# ids 0-3 fixed; control symbols 4-6 follow (SentencePiece places them right after the core ones)
SPECIAL_IDS = {PAD: 0, UNK: 1, BOS: 2, EOS: 3}
CONTROL_SYMBOLS = (MASK, CLS, SEP)


def train(
    inputs: Sequence[str],
    output_prefix: str,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    json_key: str = "text",
    max_docs: Optional[int] = None,
    num_threads: int = 2,
    character_coverage: float = 0.9999,
) -> Tokenizer:
    """Train and write ``{output_prefix}.model`` (+ ``.vocab``) atomically; return the loaded tokenizer."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type must be bpe or unigram, got {model_type!r}")
    expand_inputs(inputs)  # fail early on missing files

    def docs() -> Iterator[str]:
        for n, text in enumerate(iter_texts(inputs, json_key)):
            if max_docs is not None and n >= max_docs:
                return
            yield text

    model = io.BytesIO()
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=docs(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=character_coverage,
            pad_id=SPECIAL_IDS[PAD], unk_id=SPECIAL_IDS[UNK], bos_id=SPECIAL_IDS[BOS], eos_id=SPECIAL_IDS[EOS],
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            control_symbols=list(CONTROL_SYMBOLS),
            user_defined_symbols=["\n"],  # a newline is one token, not a byte-fallback piece
            max_sentence_length=1 << 20,  # documents, not sentences, are the training unit
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            hard_vocab_limit=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed on {', '.join(inputs)}: {e}") from None
    proto = model.getvalue()
    if not proto:
        raise DataError(f"no text found under key '{json_key}' in {', '.join(inputs)}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    path = output_prefix + ".model"
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(proto)
    os.replace(tmp, path)
    tok = Tokenizer(path)
    vocab_tmp = f"{output_prefix}.vocab.tmp.{os.getpid()}"
    with open(vocab_tmp, "w", encoding="utf-8") as f:
        for i in range(tok.vocab_size):
            f.write(f"{tok.id_to_piece(i)!r}\t{tok.sp.get_score(i)}\n")
    os.replace(vocab_tmp, output_prefix + ".vocab")
    log.info("trained %s tokenizer (vocab %d) in %.1fs -> %s", model_type, tok.vocab_size, time.time() - t0, path)
    return tok


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm train-tokenizer", description=__doc__)
    p.add_argument("--input", action="append", required=True, help="JSONL file, .jsonl.gz, glob or directory; repeatable")
    p.add_argument("--json-key", default="text")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tok = train(args.input, args.output_prefix, args.vocab_size, args.model_type, args.json_key,
                args.max_docs, args.threads)
    print(f"wrote {tok.model_path}: vocab {tok.vocab_size}, pad={tok.pad} unk={tok.unk} bos={tok.bos} "
          f"eos/eod={tok.eos} mask={tok.mask} cls={tok.cls} sep={tok.sep}")
    return 0
