"""The training tokenizer -> Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json).

For SentencePiece, builds a ``tokenizers`` pipeline that reproduces megalm's
encoding id for id (BPE or unigram, byte fallback, the dummy-prefix space,
user-defined pieces such as "\\n"); a tokenizer.json is shipped as it is, and
GPT-2 vocab.json + merges.txt as the equivalent tokenizer.json. Either way
``AutoTokenizer.from_pretrained`` on an export encodes as training did.
Differences from raw SentencePiece are documented in docs/hf.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Optional

from megalm.errors import DataError

log = logging.getLogger(__name__)

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_WS = "\u2581"


def _load_proto(model_path: str):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        with open(model_path, "rb") as f:
            proto.ParseFromString(f.read())
    except FileNotFoundError:
        raise DataError(f"tokenizer model not found: {model_path}") from None
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError (or its C++ twin)
        raise DataError(f"tokenizer model {model_path} is not a SentencePiece model ({e})") from None
    return proto


def _check_supported(proto, model_path: str) -> None:
    norm = proto.normalizer_spec
    if norm.remove_extra_whitespaces:
        raise DataError(f"{model_path}: normalizer_spec.remove_extra_whitespaces=true has no exact "
                        "tokenizers equivalent (megalm trains with it off)")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise DataError(f"{model_path}: treat_whitespace_as_suffix=true is not supported")
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM=1, BPE=2
        raise DataError(f"{model_path}: only BPE and unigram SentencePiece models convert "
                        f"(model_type={proto.trainer_spec.model_type})")


def _bpe_merges(pieces: list, vocab: dict) -> list:
    """Merges that rebuild every normal piece from two others, ranked like SentencePiece's scores (piece id)."""
    merges = []
    for piece, kind in pieces:
        if kind != _NORMAL or len(piece) < 2:
            continue
        pid = vocab[piece]
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def build_tokenizer(model_path: str):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model at ``model_path``."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = _load_proto(model_path)
    _check_supported(proto, model_path)
    pieces = [(p.piece, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    unk_id = next((i for i, (_, k) in enumerate(pieces) if k == _UNKNOWN), None)
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    if proto.trainer_spec.model_type == 2:
        unk = pieces[unk_id][0] if unk_id is not None else None
        model = BPE(vocab=vocab, merges=_bpe_merges(pieces, vocab), unk_token=unk, byte_fallback=byte_fallback,
                    fuse_unk=True, dropout=None)
    else:
        model = Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=unk_id, byte_fallback=byte_fallback)
    tok = Tokenizer(model)
    norm = proto.normalizer_spec
    # SentencePiece prepends the dummy "▁" even to text that starts with a space (Metaspace would not), so a
    # normalizer adds it. It runs on each stretch between special tokens: "a</s>b" encodes as
    # encode("a") + [eos] + encode("b"), exactly how megalm joins documents.
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if len(norm.precompiled_charsmap) else []
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(_WS))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_WS, prepend_scheme="never", split=False)
    dec = [decoders.Replace(_WS, " ")]
    if byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, k in pieces if k in (_CONTROL, _UNKNOWN)])
    # A one-character user-defined piece ("\n") is atomic already: no merge builds anything containing it,
    # so BPE/unigram emit it alone, as SentencePiece does. Longer ones must be matched before the model.
    user = [AddedToken(p, special=False, normalized=False) for p, k in pieces if k == _USER_DEFINED and len(p) > 1]
    if user:
        tok.add_tokens(user)
    return tok


def save_tokenizer(model_path: str, out_dir: str, model_max_length: Optional[int] = None,
                   bert_pairs: bool = False) -> dict:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and a copy of the .model.

    ``bert_pairs`` adds megalm's BERT sample layout ("<cls> A <sep> B <sep>", token types 0/1) as the
    post-processor, so ``tok(a, b)`` feeds a BERT export the way it was trained; without it nothing is added.
    Returns the special-token ids ({"bos_token_id": 2, ...}) for config.json / generation_config.json.
    """
    from megalm.data.tokenizer import BOS, CLS, EOS, MASK, PAD, SEP, UNK, load_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    sp = load_tokenizer(model_path)
    if sp.kind != "sentencepiece":
        return _save_fast(sp, out_dir, model_max_length, bert_pairs)
    tok = build_tokenizer(model_path)
    if bert_pairs:
        if sp.cls is None or sp.sep is None:
            raise DataError(f"{model_path} has no <cls>/<sep> pieces: cannot add the BERT pair template")
        from tokenizers.processors import TemplateProcessing

        c, s_ = sp.id_to_piece(sp.cls), sp.id_to_piece(sp.sep)
        tok.post_processor = TemplateProcessing(single=f"{c} $A {s_}", pair=f"{c} $A {s_} $B:1 {s_}:1",
                                                special_tokens=[(c, sp.cls), (s_, sp.sep)])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))
    names = {"bos_token": (BOS, sp.bos), "eos_token": (EOS, sp.eos), "unk_token": (UNK, sp.unk),
             "pad_token": (PAD, sp.pad), "mask_token": (MASK, sp.mask), "cls_token": (CLS, sp.cls),
             "sep_token": (SEP, sp.sep)}
    special = {}
    ids = {}
    for key, (_, i) in names.items():
        if i is not None:
            special[key] = sp.id_to_piece(i)
            ids[key + "_id"] = i
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length or 1_000_000_000_000_000_019_884_624_838_656,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        **special,
    }
    if bert_pairs:
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2, ensure_ascii=False)
    log.info("wrote HF tokenizer (%d pieces) from %s to %s", sp.vocab_size, model_path, out_dir)
    return ids


def _save_fast(t, out_dir: str, model_max_length: Optional[int], bert_pairs: bool) -> dict:
    """tokenizer.json (as trained: its own normalizer, pre-tokenizer and post-processor) + a config naming
    the special tokens megalm resolved, so AutoTokenizer's ids equal training's."""
    names = {"bos_token": t.bos, "eos_token": t.eos, "unk_token": t.unk, "pad_token": t.pad, "mask_token": t.mask,
             "cls_token": t.cls, "sep_token": t.sep}
    special = {k: t.id_to_piece(i) for k, i in names.items() if i is not None}
    ids = {k + "_id": i for k, i in names.items() if i is not None}
    config: dict = {}
    src_config = os.path.join(os.path.dirname(t.model_path), "tokenizer_config.json")
    if t.kind == "huggingface" and os.path.isfile(src_config):
        with open(src_config, encoding="utf-8") as f:
            config = json.load(f)  # keeps the tokenizer's own class, chat template and flags
    if bert_pairs:  # megalm's BERT sample layout as the post-processor, as for SentencePiece above
        if t.cls is None or t.sep is None:
            raise DataError(f"{t.model_path} has no cls/sep tokens: cannot add the BERT pair template")
        from tokenizers.processors import TemplateProcessing

        c, s_ = t.id_to_piece(t.cls), t.id_to_piece(t.sep)
        t.tok.post_processor = TemplateProcessing(single=f"{c} $A {s_}", pair=f"{c} $A {s_} $B:1 {s_}:1",
                                                  special_tokens=[(c, t.cls), (s_, t.sep)])
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    if t.kind == "huggingface" and not bert_pairs:
        shutil.copyfile(t.model_path, os.path.join(out_dir, "tokenizer.json"))
    else:
        t.tok.save(os.path.join(out_dir, "tokenizer.json"))
    if t.kind == "gpt2bpe":
        shutil.copyfile(t.model_path, os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(t.merges_path, os.path.join(out_dir, "merges.txt"))
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("clean_up_tokenization_spaces", False)
    config["model_max_length"] = model_max_length or config.get("model_max_length") or 1_000_000_000_000_000_019_884_624_838_656
    for k, v in special.items():
        config.setdefault(k, v)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, ensure_ascii=False)
    log.info("wrote HF tokenizer (%d tokens, %s) from %s to %s", t.vocab_size, t.kind, t.model_path, out_dir)
    return ids
