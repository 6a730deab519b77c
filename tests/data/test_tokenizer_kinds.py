"""HF tokenizer.json and GPT-2 BPE: special ids, preprocess bytes against Megatron-LM's semantics.

Megatron-LM (d98e8a64) encodes a HuggingFaceTokenizer as ``AutoTokenizer(dir)(text).input_ids`` and a
GPT2BPETokenizer as HF's GPT-2 tokenizer over vocab.json + merges.txt, both + eos under --append-eod; the
references below use transformers itself, and the bytes come from the format spec (test_preprocess).
"""

import json
import os
import shutil

import pytest

from megalm.data.preprocess import Options, main, preprocess
from megalm.data.tokenizer import GPT2BPETokenizer, HFTokenizer, load_tokenizer
from megalm.errors import DataError
from tests.data.test_preprocess import read, reference_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ODD = ["hello <|endoftext|> world", "<mask> <pad> x<sep>y", "", "   ", "日本語のテキスト。", "emoji 😀👍🏽 e\u0301",
       "tabs\tand\r\nCRLF\n\n\nnewlines", "numbers 1234567890 3.14159", "a" + " " * 40 + "b", "\u200b\ufeffzw"]


@pytest.fixture(scope="session")
def bytelevel_dir(tmp_path_factory, corpus_path):
    from megalm.data.train_tokenizer import train

    out = str(tmp_path_factory.mktemp("bl") / "tok")
    train([corpus_path], out, vocab_size=500, model_type="bytelevel-bpe")
    return out


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, bytelevel_dir):
    d = tmp_path_factory.mktemp("gpt2")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(bytelevel_dir, name), d / name)
    return str(d)


@pytest.fixture(scope="session")
def texts(corpus_texts):
    return corpus_texts[:40] + ODD


def _corpus(tmp_path, texts):
    src = tmp_path / "c.jsonl"
    with open(src, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t}, ensure_ascii=bool(i % 2)) + "\n")
    return str(src)


def _megatron_docs(encode, eod, texts):
    docs = []
    for t in texts:
        ids = encode(t)
        docs.append([ids + [eod]] if ids else [])
    return docs


def test_trained_bytelevel_special_ids(bytelevel_dir):
    t = load_tokenizer(bytelevel_dir)
    assert isinstance(t, HFTokenizer)
    assert (t.eod, t.pad, t.mask, t.cls, t.sep) == (0, 1, 2, 3, 4)
    assert t.bos == t.cls  # Megatron: no bos -> cls stands in
    assert t.vocab_size == 500
    for text in ODD:
        assert t.decode(t.encode(text)) == text  # byte-level: lossless
    assert t.word_start_table()[t.encode(" the")[0]]


def test_bare_tokenizer_json_finds_endoftext(tmp_path, bytelevel_dir):
    shutil.copy(os.path.join(bytelevel_dir, "tokenizer.json"), tmp_path / "only.json")
    t = load_tokenizer(str(tmp_path / "only.json"))
    assert t.eod == 0 and t.mask is None  # no tokenizer_config.json: only the eod is guessed


def test_gpt2_special_ids_and_mlm_refused(gpt2_dir):
    from megalm.config import from_dict
    from megalm.errors import ConfigError
    from megalm.objectives import build_objective

    t = load_tokenizer(gpt2_dir)
    assert isinstance(t, GPT2BPETokenizer)
    assert t.eod == t.bos == t.eos == 0  # <|endoftext|> is id 0 in this vocab
    assert t.mask is None
    with pytest.raises(ConfigError, match="mask"):
        build_objective(from_dict({"objective": {"name": "mlm"}, "model": {"arch": "bert"}}), t)


def test_missing_files_are_named(tmp_path, gpt2_dir):
    with pytest.raises(DataError, match="merges.txt"):
        load_tokenizer(str(tmp_path / "vocab.json"), "gpt2bpe", str(tmp_path / "merges.txt"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_tokenizer(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("workers", [0, 2])
def test_hf_tokenizer_json_matches_megatron(tmp_path, bytelevel_dir, texts, workers):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(bytelevel_dir)
    out = str(tmp_path / "o")
    preprocess([_corpus(tmp_path, texts)], out, bytelevel_dir, Options(append_eod=True), workers=workers,
               progress=False, chunk_bytes=4096)
    expect = _megatron_docs(lambda t: ref(t).input_ids, ref.eos_token_id, texts)
    assert read(out + "_text_document") == reference_bytes(expect)


@pytest.mark.parametrize("workers", [0, 2])
def test_gpt2_bpe_matches_megatron(tmp_path, gpt2_dir, texts, workers):
    from transformers import GPT2Tokenizer

    ref = GPT2Tokenizer.from_pretrained(gpt2_dir)  # what Megatron's GPT2BPETokenizer builds from the two files
    src = _corpus(tmp_path, texts)
    out = str(tmp_path / "o")
    assert main(["--input", src, "--output-prefix", out, "--tokenizer-type", "GPT2BPETokenizer",
                 "--vocab-file", os.path.join(gpt2_dir, "vocab.json"), "--merge-file",
                 os.path.join(gpt2_dir, "merges.txt"), "--append-eod", "--workers", str(workers),
                 "--no-progress"]) == 0
    expect = _megatron_docs(lambda t: ref(t).input_ids, ref.eos_token_id, texts)
    assert read(out + "_text_document") == reference_bytes(expect)
    # <|endoftext|> written in the text is the special token, as in HF's GPT-2 tokenizer
    assert ref.eos_token_id in expect[40][0][:-1]


def test_post_processor_bos_is_kept_like_megatron(tmp_path, bytelevel_dir, texts):
    """A Llama-3-style tokenizer.json (BOS from its template, eos named in tokenizer_config.json)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import AutoTokenizer

    d = tmp_path / "l3"
    d.mkdir()
    t = Tokenizer.from_file(os.path.join(bytelevel_dir, "tokenizer.json"))
    t.add_special_tokens([AddedToken("<|begin_of_text|>", special=True, normalized=False),
                          AddedToken("<|end_of_text|>", special=True, normalized=False)])
    bos = t.token_to_id("<|begin_of_text|>")
    t.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                     special_tokens=[("<|begin_of_text|>", bos)])
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"}))
    ours = load_tokenizer(str(d / "tokenizer.json"))
    assert (ours.bos, ours.eod, ours.vocab_size) == (bos, bos + 1, 502)
    ref = AutoTokenizer.from_pretrained(str(d))
    out = str(tmp_path / "o")
    preprocess([_corpus(tmp_path, texts)], out, str(d), Options(append_eod=True), workers=1, progress=False)
    expect = _megatron_docs(lambda x: ref(x).input_ids, ref.eos_token_id, texts)
    assert all(doc[0][0] == bos for doc in expect)  # every document, even an empty one, starts with BOS
    assert read(out + "_text_document") == reference_bytes(expect)


def test_hf_export_files_round_trip(tmp_path, bytelevel_dir, gpt2_dir, texts):
    from transformers import AutoTokenizer

    from megalm.hf.tokenizer import save_tokenizer

    for src in (bytelevel_dir, gpt2_dir):
        out = tmp_path / os.path.basename(src)
        ids = save_tokenizer(src, str(out), model_max_length=64)
        ours = load_tokenizer(src)
        hf = AutoTokenizer.from_pretrained(str(out))
        assert ids["eos_token_id"] == ours.eod == hf.eos_token_id
        assert all(hf(t).input_ids == ours.encode(t) for t in texts)


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface", "gpt2bpe"])
def test_long_documents_encode_in_pieces_identically(tmp_path, monkeypatch, kind, tokenizer_path, bytelevel_dir,
                                                     gpt2_dir, corpus_texts):
    import megalm.data.preprocess as pp
    import megalm.data.tokenizer as T

    path = {"sentencepiece": tokenizer_path, "huggingface": bytelevel_dir, "gpt2bpe": gpt2_dir}[kind]
    tok = load_tokenizer(path)
    long_doc = "\n".join(corpus_texts[:30]) + "\n\n  indented\n"
    whole = tok.encode(long_doc)
    monkeypatch.setattr(T, "LONG_PIECE_CHARS", 2000)
    monkeypatch.setattr(pp, "LONG_DOC_CHARS", 10_000)
    assert len(list(T._cuts(long_doc, kind == "sentencepiece"))) > 20
    out = str(tmp_path / "o")
    texts = [corpus_texts[0], long_doc, "short"]
    preprocess([_corpus(tmp_path, texts)], out, path, Options(append_eod=True), workers=0, progress=False)
    expect = [[tok.encode(t) + [tok.eod]] for t in texts]
    assert expect[1][0][:-1] == whole
    assert read(out + "_text_document") == reference_bytes(expect)
