"""The CPU causal split (two half-calls at 384 <= s <= 512) is the same attention as one is_causal call."""

import pytest
import torch
import torch.nn.functional as F

from megalm.model.causal_attention import SPLIT_LENGTHS, causal_attention, splits_on_cpu


def _qkv(s, heads=4, kv_heads=4, b=2, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(s)
    make = lambda h: torch.randn(b, h, s, d, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def _grads(fn, q, k, v):
    out = fn(q, k, v)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), go))


@pytest.mark.parametrize("s,kv_heads", [(SPLIT_LENGTHS[0], 4), (SPLIT_LENGTHS[1], 4), (449, 2), (100, 4)])
def test_matches_one_causal_call(s, kv_heads):
    q, k, v = _qkv(s, kv_heads=kv_heads)
    gqa = kv_heads != 4
    ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), q, k, v)
    got = _grads(lambda q, k, v: causal_attention(q, k, v, 0.0, gqa), q, k, v)
    for name, a, b in zip(("output", "dq", "dk", "dv"), ref, got):
        assert (a - b).abs().max().item() < 1e-6, name


def test_the_split_is_causal_in_float64():
    """Query i sees exactly keys 0..i: compared with the softmax written out, the split gives it to 1e-12."""
    s = 400
    q, k, v = (x.detach().double() for x in _qkv(s))
    scores = (q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    assert (causal_attention(q, k, v) - scores.softmax(-1) @ v).abs().max().item() < 1e-12


def test_when_it_splits():
    q, k, _ = _qkv(512)
    assert splits_on_cpu(q, k, 0.0)
    assert not splits_on_cpu(q, k, 0.1)  # dropout: one call, one RNG draw
    assert not splits_on_cpu(q, k[:, :, :256], 0.0)  # keys not the queries' positions (a KV cache)
    for s in (SPLIT_LENGTHS[0] - 1, SPLIT_LENGTHS[1] + 1):
        q, k, _ = _qkv(s)
        assert not splits_on_cpu(q, k, 0.0)


def _model_loss_and_grads(seq):
    import megalm.config as C
    from megalm.build import build_model
    from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy

    cfg = C.from_dict({"model": dict(arch="gpt", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4,
                                     seq_length=seq, make_vocab_size_divisible_by=8), "train": {"seed": 7}})
    model = build_model(cfg, 90)
    g = torch.Generator().manual_seed(3)
    ids, labels = (torch.randint(0, 90, (2, seq), generator=g) for _ in range(2))
    logits = model(input_ids=ids)
    vocab_parallel_cross_entropy(logits, labels).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_a_gpt_in_the_split_band_matches_one_call(monkeypatch):
    import megalm.model.causal_attention as ca

    seq = 400
    logits, grads = _model_loss_and_grads(seq)
    monkeypatch.setattr(ca, "SPLIT_LENGTHS", (seq + 1, seq + 1))  # the same model, one is_causal call per layer
    ref_logits, ref_grads = _model_loss_and_grads(seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=0, msg=n)
