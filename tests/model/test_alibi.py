"""ALiBi positions: the attention biases equal transformers' BLOOM reference (``build_alibi_tensor``) on every
TP rank's heads at TP 1 and 2, and a KV-cached decode of an ALiBi model equals its full forward."""

import pytest
import torch

import megalm.config as C
from megalm.build import build_model
from megalm.model.context import contexts
from megalm.parallel import state
from tests.harness import run_ranks

bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
SEQ = 12


def _model_cfg(heads: int, **extra) -> C.Config:
    return C.from_dict({"model": {"arch": "gpt", "position": "alibi", "num_layers": 2, "hidden_size": 8 * heads,
                                  "num_heads": heads, "seq_length": SEQ, "make_vocab_size_divisible_by": 8,
                                  "hidden_dropout": 0.0, "attention_dropout": 0.0, **extra},
                        "train": {"seed": 3}})


def _max_prob_diff(heads: int) -> float:
    """Causal attention probabilities under our bias vs BLOOM's, for random scores on this rank's heads.

    BLOOM adds slope x key position, we add -slope x |query - key|: a per-row constant apart on causal rows,
    which softmax removes, so the probabilities (what attention computes) must agree.
    """
    m = _model_cfg(heads).model
    ctx, _ = contexts(m, 1, SEQ, torch.device("cpu"), torch.float32, {})
    local = heads // state.tensor_size()
    first = state.tensor_rank() * local
    ref = bloom.build_alibi_tensor(torch.ones(1, SEQ), heads, torch.float32).view(heads, 1, SEQ)
    ref = ref[first:first + local][None]  # [1, local heads, 1, s]
    scores = torch.randn(1, local, SEQ, SEQ, generator=torch.Generator().manual_seed(first))
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    ours = (scores + ctx.bias).masked_fill(~ctx.mask, float("-inf")).softmax(-1)
    theirs = (scores + ref).masked_fill(~causal, float("-inf")).softmax(-1)
    assert ctx.bias.shape == (1, local, SEQ, SEQ)
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("heads", [8, 12])  # 12: not a power of two, BLOOM's interleaved extra slopes
def test_bias_matches_bloom_at_tp1(heads):
    state.destroy()
    assert _max_prob_diff(heads) < 1e-6


def _tp2(rank, world_size):
    state.initialize(world_size, 1)
    try:
        return {heads: _max_prob_diff(heads) for heads in (8, 12)}
    finally:
        state.destroy()


@pytest.mark.slow
def test_bias_matches_bloom_on_each_tp2_rank():
    for diffs in run_ranks(_tp2, 2):
        assert max(diffs.values()) < 1e-6, diffs


def test_kv_cached_decode_equals_full_forward():
    from megalm.generate import forward_step

    state.destroy()
    model = build_model(_model_cfg(4, num_kv_heads=2), 50).eval()
    ids = torch.randint(0, 50, (1, SEQ), generator=torch.Generator().manual_seed(1))
    cache = [None] * len(model.layers)
    steps = [forward_step(model, ids[:, :5], 0, cache), forward_step(model, ids[:, 5:8], 5, cache)]
    steps += [forward_step(model, ids[:, t:t + 1], t, cache) for t in range(8, SEQ)]
    with torch.no_grad():
        full = model(ids)[0, :, :50]
    torch.testing.assert_close(torch.cat(steps), full[[4, 7, *range(8, SEQ)]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[3], full[4])
