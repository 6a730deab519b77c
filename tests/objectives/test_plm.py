"""PLM: factorisation orders, two-stream masks, partial prediction, and no leakage, checked through autograd."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalm import config as C
from megalm.errors import ConfigError
from megalm.objectives import build_objective
from megalm.objectives.plm import num_predicted, order_ranks, two_stream_masks
from tests.objectives.conftest import EmbeddingTap, ToyTokenizer

SEQ = 16


def plm_cfg(position="rope", **objective) -> C.Config:
    return C.from_dict({
        "model": {"arch": "gpt", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_length": SEQ,
                  "position": position, "norm": "layernorm", "activation": "gelu", "bias": True,
                  "tie_embeddings": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "make_vocab_size_divisible_by": 8},
        "objective": {"name": "plm", **objective},
        "train": {"seed": 5},
    })


def gpt_samples(n: int, rng: np.random.Generator, vocab: int = 120) -> list[dict]:
    return [{"tokens": rng.integers(7, vocab, size=SEQ + 1)} for _ in range(n)]


@pytest.mark.parametrize("span", [False, True])
def test_orders_are_permutations_and_masks_follow_them(span):
    obj = build_objective(plm_cfg(plm_span_order=span, max_span_length=4), ToyTokenizer())
    batch = obj.collate(gpt_samples(64, np.random.default_rng(0)), np.random.default_rng(1))
    rank = batch["order_rank"]
    assert (rank.sort(-1).values == torch.arange(SEQ)).all()
    # 64 samples, 16 tokens: the orders differ between samples
    assert len({tuple(r.tolist()) for r in rank}) == 64
    content, query = (m[:, 0] for m in two_stream_masks(rank))  # the masks the order stands for (dense form)
    for b in range(4):
        for i in range(SEQ):
            for j in range(SEQ):
                assert bool(content[b, i, j]) == bool(rank[b, j] <= rank[b, i])
                assert bool(query[b, i, j]) == bool(rank[b, j] < rank[b, i])
    assert not query.diagonal(dim1=1, dim2=2).any()  # the query stream never sees its own token
    assert content.diagonal(dim1=1, dim2=2).all()
    if span:  # contiguous spans stay contiguous, left to right, in the order
        steps = (rank[:, 1:] - rank[:, :-1] == 1).float().mean()
        assert steps > 0.45, steps
    else:
        assert (rank[:, 1:] - rank[:, :-1] == 1).float().mean() < 0.2


@pytest.mark.parametrize("k", [1, 3, 6])
def test_partial_prediction_predicts_the_last_1_over_k(k):
    obj = build_objective(plm_cfg(plm_k=k), ToyTokenizer())
    batch = obj.collate(gpt_samples(8, np.random.default_rng(2)), np.random.default_rng(3))
    n = num_predicted(SEQ, k)
    assert n == max(1, SEQ // k)
    target = batch["loss_mask"] > 0
    assert (target.sum(-1) == n).all()
    assert (target == (batch["order_rank"] >= SEQ - n)).all()
    samples = gpt_samples(8, np.random.default_rng(2))
    assert torch.equal(batch["labels"], torch.from_numpy(np.stack([s["tokens"][:SEQ] for s in samples])))


def test_span_order_counts_spans_up_to_max_length():
    rng = np.random.default_rng(4)
    lengths = rng.integers(1, 4, size=(200, SEQ))
    rank = order_ranks(200, SEQ, np.random.default_rng(5), lengths)
    # every maximal run of consecutive positions with consecutive ranks is at most... a concatenation of spans;
    # the span starts implied by ``lengths`` must each begin a new step in the order
    starts = np.zeros((200, SEQ), dtype=bool)
    ends = np.cumsum(lengths, axis=1)
    for r in range(200):
        starts[r, 0] = True
        starts[r, ends[r][ends[r] < SEQ]] = True
    inside = ~starts[:, 1:]  # position t+1 continues the span of t
    assert (rank[:, 1:][inside] == rank[:, :-1][inside] + 1).all()


@pytest.mark.parametrize("position,span", [("rope", False), ("learned", False), ("rope", True)])
def test_query_stream_sees_only_earlier_tokens_in_the_order(position, span):
    """d(query-stream loss at i)/d(embedding of j) is zero for j == i and j later in the order, non-zero before."""
    from megalm.build import build_model

    tok = ToyTokenizer()
    cfg = plm_cfg(position, plm_span_order=span, plm_k=2)
    obj = build_objective(cfg, tok)
    batch = obj.collate(gpt_samples(2, np.random.default_rng(6)), np.random.default_rng(7))
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    tap = EmbeddingTap(model)
    logits = model(**obj.inputs(batch))
    rank = batch["order_rank"]
    v = tok.vocab_size
    for b in range(2):
        for i in range(SEQ):  # every position's query stream, predicted or not
            loss_i = F.cross_entropy(logits[b, i, :v].float()[None], batch["labels"][b, i][None])
            (grad,) = torch.autograd.grad(loss_i, tap.leaf, retain_graph=True)
            norm = grad.norm(dim=-1)
            assert (norm[1 - b] == 0).all()  # nothing crosses samples
            earlier = rank[b] < rank[b, i]
            assert (norm[b][~earlier] == 0).all(), f"sample {b} pos {i}: leak from itself or later tokens"
            assert (norm[b][earlier] > 1e-9).all(), f"sample {b} pos {i}: an earlier token is not seen"


def test_content_stream_sees_itself_and_earlier_tokens():
    """The last block's content stream h at i depends on tokens at or before i in the order only."""
    from megalm.build import build_model

    tok = ToyTokenizer()
    cfg = plm_cfg()
    obj = build_objective(cfg, tok)
    batch = obj.collate(gpt_samples(1, np.random.default_rng(8)), np.random.default_rng(9))
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    tap = EmbeddingTap(model)
    streams = {}
    last = model.layers[-1]
    two_stream = last.forward_two_stream

    def capture(*args):  # Block.forward calls forward_two_stream: the block's hooks would not see the h stream alone
        streams["h"], g = two_stream(*args)
        return streams["h"], g

    last.forward_two_stream = capture
    model(**obj.inputs(batch))
    rank = batch["order_rank"][0]
    for i in range(SEQ):
        (grad,) = torch.autograd.grad(streams["h"][0, i].sum(), tap.leaf, retain_graph=True)
        norm = grad[0].norm(dim=-1)
        seen = rank <= rank[i]
        assert (norm[~seen] == 0).all() and (norm[seen] > 1e-9).all(), i


def test_loss_is_the_mean_over_predicted_tokens():
    from megalm.build import build_model

    tok = ToyTokenizer()
    cfg = plm_cfg()
    obj = build_objective(cfg, tok)
    batch = obj.collate(gpt_samples(3, np.random.default_rng(10)), np.random.default_rng(11))
    model = build_model(cfg, tok.vocab_size)
    logits = model(**obj.inputs(batch))
    target = batch["loss_mask"] > 0
    want = F.cross_entropy(logits[..., :tok.vocab_size][target].float(), batch["labels"][target])
    torch.testing.assert_close(obj.loss(logits, obj.targets(batch)), want)


def test_pipeline_inputs_follow_default_inputs():
    from megalm.build import default_inputs

    cfg = C.from_dict({**plm_cfg().to_dict(), "parallel": {"pipeline": 2}})
    obj = build_objective(cfg, ToyTokenizer())
    batch = obj.collate(gpt_samples(2, np.random.default_rng(12)), np.random.default_rng(13))
    names = default_inputs(cfg)
    assert len(obj.pipeline_inputs(batch)) == len(names)
    for name, t in zip(names, obj.pipeline_inputs(batch)):
        assert t is batch[name]


def test_plm_needs_the_gpt_two_stream_model():
    with pytest.raises(ConfigError, match="model.arch=gpt"):
        build_objective(C.from_dict({**plm_cfg().to_dict(), "model": {"arch": "bert"}}), ToyTokenizer())
