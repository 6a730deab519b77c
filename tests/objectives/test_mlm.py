"""MLM: masking rates and shares, special tokens, whole words and spans, no leak of masked tokens, the loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalm import config as C
from megalm.errors import ConfigError
from megalm.objectives import build_objective
from megalm.objectives.mlm import MaskedLM, special_ids
from tests.objectives.conftest import bert_samples

MODES = {
    "token": {},
    "whole_word": {"whole_word": True},
    "span": {"span_masking": True},
    "whole_word_span": {"whole_word": True, "span_masking": True},
}


def mlm(tok, **objective) -> MaskedLM:
    return build_objective(C.from_dict({"objective": {"name": "mlm", **objective}}), tok)


def arrays(batch):
    lab, inp = batch["labels"].numpy(), batch["input_ids"].numpy()
    return lab, inp, batch["loss_mask"].numpy() > 0


def word_ids(tok, tokens):
    """Group id per token for the toy tokenizer's words (a special token is its own word)."""
    starts = tok.is_word_start(tokens) | np.isin(tokens, special_ids(tok))
    starts[:, 1:] |= np.isin(tokens[:, :-1], special_ids(tok))
    starts[:, 0] = True
    return np.cumsum(starts, axis=1)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p", [0.15, 0.3])
def test_rates_and_shares(toy_tokenizer, mode, p):
    """Over ~140k tokens: chosen = p of the maskable ones; of those 80% [MASK], 10% random, 10% unchanged."""
    obj = mlm(toy_tokenizer, mask_prob=p, **MODES[mode])
    batch = obj.collate(bert_samples(toy_tokenizer, 3000, 64, np.random.default_rng(0)), np.random.default_rng(1))
    lab, inp, chosen = arrays(batch)
    maskable = batch["padding_mask"].numpy() & ~np.isin(lab, special_ids(toy_tokenizer))
    n = chosen.sum()
    rate = n / maskable.sum()
    assert abs(rate - p) < 0.006, rate
    to_mask = (inp[chosen] == toy_tokenizer.mask).mean()
    to_random = ((inp[chosen] != lab[chosen]) & (inp[chosen] != toy_tokenizer.mask)).mean()
    kept = (inp[chosen] == lab[chosen]).mean()
    # 5 standard errors of a binomial share over n draws
    for share, want in ((to_mask, 0.8), (to_random, 0.1), (kept, 0.1)):
        assert abs(share - want) < 5 * np.sqrt(want * (1 - want) / n), (share, want, n)
    # only chosen tokens change, and the loss counts exactly the chosen ones
    assert (inp[~chosen] == lab[~chosen]).all()
    assert torch.equal(batch["loss_mask"], torch.from_numpy(chosen.astype(np.float32)))


@pytest.mark.parametrize("mode", list(MODES))
def test_special_tokens_and_padding_never_masked(toy_tokenizer, mode):
    obj = mlm(toy_tokenizer, mask_prob=0.5, **MODES[mode])
    batch = obj.collate(bert_samples(toy_tokenizer, 500, 48, np.random.default_rng(2)), np.random.default_rng(3))
    lab, inp, chosen = arrays(batch)
    special = np.isin(lab, special_ids(toy_tokenizer)) | ~batch["padding_mask"].numpy()
    assert special.sum() > 500 * 3
    assert not chosen[special].any()
    assert (inp[special] == lab[special]).all()
    # random replacements are never special tokens: [MASK] appears only where chosen, other specials only as before
    replaced = chosen & (inp != lab) & (inp != toy_tokenizer.mask)
    assert replaced.sum() > 100
    assert not np.isin(inp[replaced], special_ids(toy_tokenizer)).any()
    assert not (inp[~chosen] == toy_tokenizer.mask).any()


@pytest.mark.parametrize("mode", ["whole_word", "whole_word_span"])
def test_whole_words_are_masked_whole(toy_tokenizer, mode):
    obj = mlm(toy_tokenizer, **MODES[mode])
    batch = obj.collate(bert_samples(toy_tokenizer, 400, 64, np.random.default_rng(4)), np.random.default_rng(5))
    lab, _, chosen = arrays(batch)
    words = word_ids(toy_tokenizer, lab)
    multi = 0
    for row in range(len(lab)):
        for w in np.unique(words[row][chosen[row]]):
            members = words[row] == w
            assert chosen[row][members].all(), f"row {row}: word {w} partly masked"
            multi += members.sum() > 1
    assert multi > 100  # the toy words really have several pieces


def _run_lengths(chosen: np.ndarray) -> np.ndarray:
    padded = np.pad(chosen.astype(np.int8), ((0, 0), (1, 1)))
    d = np.diff(padded, axis=1)
    return (np.nonzero(d == -1)[1] - np.nonzero(d == 1)[1])


def test_span_masking_masks_runs(toy_tokenizer):
    """Spans of 1..max_span_length tokens (p ~ 1/n): masked runs are longer than independent tokens give."""
    samples = bert_samples(toy_tokenizer, 1000, 64, np.random.default_rng(6))
    _, _, tok_chosen = arrays(mlm(toy_tokenizer).collate(samples, np.random.default_rng(7)))
    _, _, span_chosen = arrays(mlm(toy_tokenizer, span_masking=True, max_span_length=3).collate(
        samples, np.random.default_rng(7)))
    tok_runs, span_runs = _run_lengths(tok_chosen), _run_lengths(span_chosen)
    # independent tokens at 15%: mean run ~1.17; spans with p(n) ~ 1/n over 1..3: ~1.64 before merging
    assert tok_runs.mean() < 1.25
    assert span_runs.mean() > 1.5
    _, _, long_chosen = arrays(mlm(toy_tokenizer, span_masking=True, max_span_length=8).collate(
        samples, np.random.default_rng(7)))
    assert _run_lengths(long_chosen).mean() > span_runs.mean() + 0.4


def test_collate_is_deterministic_in_its_rng(toy_tokenizer):
    obj = mlm(toy_tokenizer, whole_word=True)
    samples = bert_samples(toy_tokenizer, 8, 32, np.random.default_rng(8))
    a, b = obj.collate(samples, np.random.default_rng(9)), obj.collate(samples, np.random.default_rng(9))
    c = obj.collate(samples, np.random.default_rng(10))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


def tiny_bert_cfg(binary_head="sop", **objective) -> C.Config:
    return C.from_dict({
        "model": {"arch": "bert", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_length": 32,
                  "position": "learned", "norm": "layernorm", "norm_position": "post", "activation": "gelu",
                  "bias": True, "hidden_dropout": 0.0, "attention_dropout": 0.0, "make_vocab_size_divisible_by": 8},
        "objective": {"name": "mlm", "binary_head": binary_head, **objective},
        "train": {"seed": 3},
    })


@pytest.mark.parametrize("mode", list(MODES))
def test_masked_positions_never_see_their_token(toy_tokenizer, mode):
    """Changing the original token under a [MASK]/random position changes nothing the model sees, or its output.

    (The 10% "unchanged" positions keep their token by BERT's design; they are not replaced, so not tested here.)
    """
    from megalm.build import build_model

    cfg = tiny_bert_cfg(**MODES[mode])
    obj = build_objective(cfg, toy_tokenizer)
    samples = bert_samples(toy_tokenizer, 16, 32, np.random.default_rng(11))
    batch = obj.collate(samples, np.random.default_rng(12))
    lab, inp, chosen = arrays(batch)
    replaced = chosen & (inp != lab)
    assert (inp[replaced] == toy_tokenizer.mask).sum() >= 10 and (inp[replaced] != toy_tokenizer.mask).sum() >= 3
    # swap each replaced token for another of the same word-start class (so word grouping is unchanged)
    changed = [dict(s, tokens=s["tokens"].copy()) for s in samples]
    for r, c in zip(*np.nonzero(replaced)):
        old = int(changed[r]["tokens"][c])
        changed[r]["tokens"][c] = old + 3 if old + 3 < toy_tokenizer.vocab_size else old - 3
    batch2 = obj.collate(changed, np.random.default_rng(12))
    assert not torch.equal(batch["labels"], batch2["labels"])
    for k in ("input_ids", "token_type_ids", "padding_mask", "loss_mask"):
        assert torch.equal(batch[k], batch2[k]), k
    torch.manual_seed(0)
    model = build_model(cfg, toy_tokenizer.vocab_size).eval()
    out1, out2 = model(**obj.inputs(batch)), model(**obj.inputs(batch2))
    torch.testing.assert_close(out1[0], out2[0], rtol=0, atol=0)


def test_loss_counts_only_chosen_positions_and_adds_the_binary_head(toy_tokenizer):
    from megalm.build import build_model

    cfg = tiny_bert_cfg()
    obj = build_objective(cfg, toy_tokenizer)
    batch = obj.collate(bert_samples(toy_tokenizer, 4, 32, np.random.default_rng(13)), np.random.default_rng(14))
    model = build_model(cfg, toy_tokenizer.vocab_size)
    logits, binary = model(**obj.inputs(batch))
    logits.retain_grad()
    loss = obj.loss((logits, binary), obj.targets(batch))
    chosen = batch["loss_mask"] > 0
    v = toy_tokenizer.vocab_size
    want_mlm = F.cross_entropy(logits[..., :v][chosen].float(), batch["labels"][chosen])
    want_bin = F.cross_entropy(binary.float(), batch["binary_labels"])
    torch.testing.assert_close(loss, want_mlm + want_bin)
    loss.backward()
    per_pos = logits.grad.abs().sum(-1)
    assert (per_pos[~chosen] == 0).all() and (per_pos[chosen] > 0).all()
    m = obj.metrics((logits, binary), obj.targets(batch))
    assert set(m) == {"mlm_loss", "binary_loss", "binary_acc"}
    assert abs(m["mlm_loss"] - want_mlm.item()) < 1e-5
    # the pipeline's last stage returns a tuple; without a binary head only (logits,)
    cfg_none = tiny_bert_cfg(binary_head="none")
    obj_none = build_objective(cfg_none, toy_tokenizer)
    torch.testing.assert_close(obj_none.loss((logits,), obj.targets(batch)), want_mlm)
    torch.testing.assert_close(obj_none.loss((logits, None), obj.targets(batch)), want_mlm)


def test_tokenizer_without_mask_is_refused(toy_tokenizer):
    toy_tokenizer.mask = None
    with pytest.raises(ConfigError, match="<mask>"):
        mlm(toy_tokenizer)


def test_inputs_follow_the_pipeline_input_names(toy_tokenizer):
    from megalm.build import default_inputs

    cfg = tiny_bert_cfg()
    obj = build_objective(cfg, toy_tokenizer)
    batch = obj.collate(bert_samples(toy_tokenizer, 2, 32, np.random.default_rng(15)), np.random.default_rng(16))
    names = default_inputs(cfg)
    assert len(obj.pipeline_inputs(batch)) == len(names)
    assert all(t is batch[n] for n, t in zip(names, obj.pipeline_inputs(batch)))


@pytest.mark.parametrize("binary_head", ["sop", "nsp"])
def test_real_pairs_with_sentencepiece_whole_words(bert_data, tmp_path, binary_head):
    """BertPairDataset samples + the real tokenizer: specials kept, SentencePiece words masked whole, labels kept."""
    from megalm.data.bert_dataset import BertPairDataset
    from megalm.data.tokenizer import Tokenizer

    tok_path, prefix = bert_data
    tok = Tokenizer(tok_path)
    ds = BertPairDataset(prefix, "train", (0, 90), 64, 64, 1, str(tmp_path), tok, binary_head=binary_head)
    obj = mlm(tok, whole_word=True, binary_head=binary_head)
    samples = [ds[i] for i in range(64)]
    batch = obj.collate(samples, np.random.default_rng(17))
    lab, inp, chosen = arrays(batch)
    specials = np.isin(lab, [tok.cls, tok.sep, tok.pad])
    assert specials.sum() >= 64 * 3 and not chosen[specials].any() and (inp[specials] == lab[specials]).all()
    assert abs(chosen.sum() / (batch["padding_mask"].numpy() & ~specials).sum() - 0.15) < 0.03
    starts = tok.is_word_start(lab) | specials
    starts[:, 1:] |= specials[:, :-1]
    words = np.cumsum(starts, axis=1)
    pieces = 0
    for r in range(len(lab)):
        for w in np.unique(words[r][chosen[r]]):
            assert chosen[r][words[r] == w].all()
            pieces += (words[r] == w).sum() > 1
    assert pieces > 10  # some chosen words have several pieces
    assert torch.equal(batch["binary_labels"], torch.tensor([int(s["is_random"]) for s in samples]))
    assert 10 < int(batch["binary_labels"].sum()) < 54
