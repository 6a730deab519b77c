"""Packed-document attention and key padding without [s, s] masks equal the dense-mask path, and stay small."""

import pytest
import torch

import megalm.config as C
from megalm.build import build_model
from megalm.model.context import attention_context
from megalm.model.documents import BLOCK, document_block_mask, documents_attention, packed_documents
from megalm.parallel import state
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalm.parallel.layers import shard
from tests.harness import run_ranks

VOCAB = 90


def _cfg(tp=1):
    raw = dict(arch="gpt", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4, seq_length=40,
               make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0)
    return C.from_dict({"model": raw, "train": {"seed": 3}, "parallel": {"tensor": tp}})


def _segments(b=3, s=40):
    """Documents of uneven lengths; sample 1 is one document, sample 2 has one-token documents."""
    seg = torch.zeros(b, s, dtype=torch.long)
    seg[0, 7:] = 1
    seg[0, 30:] = 2
    seg[2, 1:] = 1
    seg[2, 2:] = 2
    seg[2, 25:] = 3
    return seg


def _dense_same_document(seg):
    return (seg[:, None, :, None] == seg[:, None, None, :])


def _run(model, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    logits = model(**kwargs)
    logits = logits[0] if isinstance(logits, tuple) else logits
    loss = vocab_parallel_cross_entropy(logits, labels).mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(b=3, s=40):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (b, s), generator=g), torch.randint(0, VOCAB, (b, s), generator=g)


def test_documents_context_holds_no_dense_mask():
    seg = _segments()
    ctx = attention_context(3, 40, True, torch.device("cpu"), segment_ids=seg)
    assert ctx.mask is None and ctx.documents is not None
    assert ctx.documents.spans[0] == ((0, 7), (7, 30), (30, 40)) and ctx.documents.spans[1] == ((0, 40),)
    # ids that are not runs (a document id coming back) keep the exact dense path
    ctx = attention_context(1, 4, True, torch.device("cpu"), segment_ids=torch.tensor([[0, 1, 0, 1]]))
    assert ctx.documents is None and ctx.mask is not None


def test_document_attention_matches_dense_mask_logits_and_grads():
    ids, labels = _batch()
    seg = _segments()
    model = build_model(_cfg(), VOCAB)
    ref_logits, ref_grads = _run(model, labels, input_ids=ids, attention_mask=_dense_same_document(seg))
    logits, grads = _run(model, labels, input_ids=ids, segment_ids=seg)
    torch.testing.assert_close(logits[..., :VOCAB], ref_logits[..., :VOCAB], atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=0, msg=n)


def test_document_masked_training_matches_dense_mask_losses():
    """Eight AdamW steps on packed documents: per-step losses equal the dense-mask run's (fp32)."""
    seg = _segments()
    runs = []
    for kwargs in ({"segment_ids": seg}, {"attention_mask": _dense_same_document(seg)}):
        model = build_model(_cfg(), VOCAB)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(8):
            ids, labels = _batch()
            ids = (ids + step) % VOCAB
            loss = vocab_parallel_cross_entropy(model(ids, **kwargs), labels).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs.append(losses)
    assert runs[0][-1] < runs[0][0]  # it trains
    for a, b in zip(*runs):
        assert abs(a - b) < 1e-5, runs


def test_bert_key_padding_matches_dense_mask():
    cfg = C.from_dict({"model": dict(arch="bert", num_layers=2, hidden_size=64, num_heads=4, seq_length=24,
                                     position="learned", norm="layernorm", norm_position="post", activation="gelu",
                                     make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0),
                       "train": {"seed": 3}})
    ids, labels = _batch(2, 24)
    pad = torch.ones(2, 24, dtype=torch.bool)
    pad[1, 15:] = False
    ctx = attention_context(2, 24, False, torch.device("cpu"), padding_mask=pad)
    assert ctx.mask is None and ctx.key_padding.shape == (2, 1, 1, 24)
    model = build_model(cfg, VOCAB)
    dense = pad[:, None, None, :].expand(2, 1, 24, 24)
    ref_logits, ref_grads = _run(model, labels, input_ids=ids, attention_mask=dense)
    logits, grads = _run(model, labels, input_ids=ids, padding_mask=pad)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=0, msg=n)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_equals_dense_mask_and_its_attention():
    """The CUDA path's block mask, checked on CPU: block classes, and FlexAttention's forward (CPU: no grad)."""
    s = 4 * BLOCK
    seg = torch.zeros(2, s, dtype=torch.long)
    seg[0, 100:] = 1
    seg[0, 300:] = 2  # a document spanning whole blocks: full blocks below the diagonal
    seg[1, 256:] = 1  # boundaries on block edges
    bm = document_block_mask(seg)
    dense = torch.ones(s, s, dtype=torch.bool).tril() & _dense_same_document(seg)[:, 0]
    blocks = dense.view(2, 4, BLOCK, 4, BLOCK)
    some, full = blocks.any(dim=(2, 4)), blocks.all(dim=(2, 4))
    assert torch.equal(bm.to_dense()[:, 0].bool(), some)
    assert int(bm.full_kv_num_blocks.sum()) == int(full.sum()) > 0
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, s, 16, generator=g) for _ in range(3))
    docs = packed_documents(seg, flex=True)
    with torch.no_grad():
        flex = documents_attention(q, k, v, docs, 0.0, False)
        spans = documents_attention(q, k, v, packed_documents(seg, flex=False), 0.0, False)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(spans, ref, atol=1e-5, rtol=0)


def test_rows_sharing_spans_run_batched_and_match_the_dense_mask():
    """Rows with the same document spans (whole-document rows, repeated splits) share one call per span; a span
    in the CPU split band (400 tokens) takes the two half-calls. Outputs and q/k/v gradients equal the dense mask's."""
    s = 448
    seg = torch.zeros(5, s, dtype=torch.long)
    seg[0, 48:] = 1  # spans (0, 48), (48, 448): the second is in the split band
    seg[2, 48:] = 1  # the same spans as row 0
    seg[3, 200:] = 1  # its own spans; rows 1 and 4 are one whole document each
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, s, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(5, 2, s, 16, generator=g, requires_grad=True) for _ in range(2))  # GQA: 2 kv heads
    dense = (torch.ones(s, s, dtype=torch.bool).tril() & _dense_same_document(seg)[:, 0])[:, None]
    go = torch.randn(5, 4, s, 16, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    got = documents_attention(q, k, v, packed_documents(seg, flex=False), 0.0, True)
    got_grads = torch.autograd.grad(got, (q, k, v), go)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for name, a, b in zip("qkv", got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_mask_memory_at_seq_8192_is_blocks_not_tokens_squared():
    s = 8192
    seg = (torch.arange(s) // 1000).unsqueeze(0)  # nine documents, boundaries inside blocks
    docs = packed_documents(seg, flex=True)
    bm = docs.block_mask
    mask_bytes = sum(t.numel() * t.element_size() for t in vars(bm).values() if torch.is_tensor(t))
    n = s // BLOCK
    assert mask_bytes <= 8 * 4 * n * n + 64 * n  # a few int32 per block pair
    assert mask_bytes * 1000 < s * s  # a bool [s, s] mask would be 67 MB; this is ~0.1 MB
    # and the CPU path allocates nothing of s x s elements, forward and backward
    q, k, v = (torch.randn(1, 1, s, 8, requires_grad=True) for _ in range(3))
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        documents_attention(q, k, v, packed_documents(seg, flex=False), 0.0, False).sum().backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest < s * s // 4, biggest  # the largest single allocation (bytes) is far below [s, s] bool


def _tp_documents_vs_dense(rank, world_size):
    ids, labels = _batch()
    seg = _segments()
    state.destroy()
    ref_logits, ref_grads = _run(build_model(_cfg(), VOCAB), labels, input_ids=ids,
                                 attention_mask=_dense_same_document(seg))
    state.initialize(world_size, 1)
    try:
        model = build_model(_cfg(world_size), VOCAB)
        logits, grads = _run(model, labels, input_ids=ids, segment_ids=seg)
        per = logits.size(-1)
        worst = (logits - ref_logits[..., rank * per:(rank + 1) * per]).nan_to_num(posinf=0, neginf=0).abs().max()
        for n, p in model.named_parameters():
            ref = ref_grads[n]
            if getattr(p, "tensor_model_parallel", False):
                ref = shard(ref, p.partition_dim, p.partitions, rank, world_size)
            worst = max(worst, (grads[n] - ref).abs().max())
        return float(worst)
    finally:
        state.destroy()


@pytest.mark.slow
def test_document_attention_at_tp2_matches_dense_single_rank():
    assert max(run_ranks(_tp_documents_vs_dense, 2)) < 1e-5
