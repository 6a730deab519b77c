"""``megalm train-tokenizer``: train a SentencePiece model or a byte-level BPE tokenizer.json from JSONL.

SentencePiece: identity normalisation, no whitespace squeezing, byte fallback
and split digits make decode(encode(text)) == text for code, newlines and
indentation; the special pieces the objectives need get fixed ids (see
tokenizer.py). Byte-level BPE (``--model-type bytelevel-bpe``, GPT-2 style,
lossless by construction) writes a Hugging Face directory that also holds the
same vocabulary as GPT-2 ``vocab.json`` + ``merges.txt``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import os
import shutil
import time
from typing import Iterator, Optional, Sequence

from megalm.data.jsonl import expand_inputs, iter_texts
from megalm.data.tokenizer import (BOS, CLS, ENDOFTEXT, EOS, MASK, PAD, SEP, UNK, BaseTokenizer, HFTokenizer,
                                   Tokenizer)
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
) -> BaseTokenizer:
    """Train and write ``{output_prefix}.model`` (+ ``.vocab``) atomically; return the loaded tokenizer."""
    import sentencepiece as spm

    if model_type == "bytelevel-bpe":
        return train_bytelevel(inputs, output_prefix, vocab_size, json_key, max_docs)
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type must be bpe, unigram or bytelevel-bpe, got {model_type!r}")
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


# byte-level BPE specials: eod first (id 0), then what MLM/BERT pairs need; no unk (every byte is a token)
BYTELEVEL_SPECIALS = (ENDOFTEXT, PAD, MASK, CLS, SEP)


def train_bytelevel(inputs: Sequence[str], output_dir: str, vocab_size: int = 32000, json_key: str = "text",
                    max_docs: Optional[int] = None) -> BaseTokenizer:
    """Train a GPT-2-style byte-level BPE; write ``output_dir``/{tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, vocab.json, merges.txt}; return the loaded HF tokenizer."""
    from tokenizers import Tokenizer as _Tok, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    expand_inputs(inputs)
    tok = _Tok(BPE(dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BYTELEVEL_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    docs = itertools.islice(iter_texts(inputs, json_key), max_docs)
    t0 = time.time()
    tok.train_from_iterator(docs, trainer)
    if tok.get_vocab_size() <= len(BYTELEVEL_SPECIALS):
        raise DataError(f"no text found under key '{json_key}' in {', '.join(inputs)}")
    tmp = f"{output_dir.rstrip(os.sep)}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    tok.model.save(tmp)  # vocab.json + merges.txt: the same BPE in GPT-2's two-file format
    special = {"eos_token": ENDOFTEXT, "pad_token": PAD, "mask_token": MASK, "cls_token": CLS, "sep_token": SEP}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    out = HFTokenizer(output_dir)
    log.info("trained byte-level BPE (vocab %d) in %.1fs -> %s", out.vocab_size, time.time() - t0, output_dir)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm train-tokenizer", description=__doc__)
    p.add_argument("--input", action="append", required=True, help="JSONL file, .jsonl.gz, glob or directory; repeatable")
    p.add_argument("--json-key", default="text")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("bpe", "unigram", "bytelevel-bpe"), default="bpe",
                   help="bpe/unigram: SentencePiece; bytelevel-bpe: a GPT-2-style Hugging Face tokenizer.json")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.model and PREFIX.vocab (SentencePiece), or the directory PREFIX "
                        "(bytelevel-bpe: tokenizer.json, tokenizer_config.json, vocab.json, merges.txt)")
    p.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tok = train(args.input, args.output_prefix, args.vocab_size, args.model_type, args.json_key,
                args.max_docs, args.threads)
    where = tok.dir if isinstance(tok, HFTokenizer) else tok.model_path
    print(f"wrote {where}: vocab {tok.vocab_size}, pad={tok.pad} unk={tok.unk} bos={tok.bos} "
          f"eos/eod={tok.eos} mask={tok.mask} cls={tok.cls} sep={tok.sep}")
    return 0
