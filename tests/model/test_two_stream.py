"""PLM's two streams by factorisation order (no [s, s] masks) equal the dense-mask path, and stay O(s)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import megalm.config as C
from megalm.build import build_model, pipeline_layers
from megalm.model.context import contexts
from megalm.model.two_stream import (CPU_ORDER_MIN_SEQ, dense_masks, factorisation_order, two_stream_attention,
                                     use_order)
from megalm.objectives import build_objective
from megalm.objectives.plm import order_ranks
from megalm.parallel import state
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalm.parallel.layers import shard
from tests.harness import run_ranks
from tests.model.test_pipeline import build_sequential
from tests.objectives.conftest import ToyTokenizer
from tests.parallel.tp_check import VOCAB, make_cfg

S = 16


def _ranks(span: bool, b: int = 3, s: int = S, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    spans = rng.integers(1, 4, size=(b, s)) if span else None
    return torch.from_numpy(order_ranks(b, s, rng, spans))


def _inputs(rank: torch.Tensor, dense: bool) -> dict:
    b, s = rank.shape
    g = torch.Generator().manual_seed(2)
    named = {"input_ids": torch.randint(0, VOCAB, (b, s), generator=g), "position_ids": torch.arange(s).expand(b, s)}
    if dense:
        content, query = dense_masks(rank)
        return {**named, "content_mask": content, "query_mask": query, "two_stream": True}
    return {**named, "order_rank": rank}


def _run(model, labels, kwargs):
    model.zero_grad(set_to_none=True)
    logits = model(**kwargs)
    vocab_parallel_cross_entropy(logits, labels).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _order(cfg: C.Config, **model) -> C.Config:
    """The order path at any seq_length (``auto`` picks the dense masks for short sequences on CPU)."""
    raw = cfg.to_dict()
    raw["model"].update(two_stream_attention="order", **model)
    return C.from_dict(raw)


def _plm_cfg(variant: str, tp: int = 1, sp: bool = False, **train) -> C.Config:
    """tp_check's PLM model (rope, GQA 8/4) or a learned-position MHA one (tp_check's gpt2 shape)."""
    cfg = make_cfg("plm", tp, sp, **train)
    if variant == "learned_mha":
        return _order(cfg, position="learned", num_kv_heads=None, norm="layernorm", activation="gelu", bias=True)
    return _order(cfg)


def test_context_holds_the_order_not_masks():
    rank = _ranks(False)
    ctx, qctx = contexts(_plm_cfg("rope_gqa").model, 3, S, torch.device("cpu"), torch.float32, {"order_rank": rank})
    assert ctx.mask is None and qctx.mask is None and ctx.order is qctx.order is not None
    assert torch.equal(ctx.order.order, rank.argsort(-1)) and torch.equal(ctx.order.rank, rank)


def test_auto_takes_the_measured_faster_path():
    """auto: dense masks on CPU below CPU_ORDER_MIN_SEQ (measured faster there), the order path from it on and on
    CUDA; "masks" forces the dense path (the same masks as the objective's two_stream_masks)."""
    assert not use_order("auto", CPU_ORDER_MIN_SEQ - 1, torch.device("cpu"))
    assert use_order("auto", CPU_ORDER_MIN_SEQ, torch.device("cpu"))
    assert use_order("auto", 16, torch.device("cuda")) and not use_order("masks", 8192, torch.device("cuda"))
    rank = _ranks(False)
    m = make_cfg("plm").model
    assert m.two_stream_attention == "auto"
    ctx, qctx = contexts(m, 3, S, torch.device("cpu"), torch.float32, {"order_rank": rank})
    content, query = dense_masks(rank)
    assert ctx.order is None and torch.equal(ctx.mask, content) and torch.equal(qctx.row_ok, query.any(-1, True))


def test_bad_order_ranks_are_refused():
    with pytest.raises(ValueError, match="permutation"):
        factorisation_order(torch.tensor([[0, 1, 1, 3]]))
    with pytest.raises(ValueError, match=r"integer \[b, s\]"):
        factorisation_order(torch.zeros(1, 4))
    m = make_cfg("plm").model
    rank = _ranks(False)
    with pytest.raises(ValueError, match="not both"):
        contexts(m, 3, S, torch.device("cpu"), torch.float32, {"order_rank": rank, "query_mask": dense_masks(rank)[1]})


@pytest.mark.parametrize("gqa,s", [(False, 17), (True, 17), (True, 400)])  # 400: causal_attention's CPU split
def test_attention_matches_dense_masks_including_the_empty_query_row(gqa, s):
    """float64, both outputs and q/k/v grads; the first token of each order has no query-stream key (zeros)."""
    b, h, d = 3, 4, 8
    g = torch.Generator().manual_seed(0)
    rank = torch.stack([torch.randperm(s, generator=g) for _ in range(b)])
    shapes = [(b, h, s, d)] * 2 + [(b, 2 if gqa else h, s, d)] * 2
    x = [torch.randn(*sh, generator=g, dtype=torch.float64, requires_grad=True) for sh in shapes]
    w = [torch.randn(b, s, h * d, generator=g, dtype=torch.float64) for _ in range(2)]
    got = two_stream_attention(*x, factorisation_order(rank), 0.0, gqa)
    content, query = dense_masks(rank)
    row_ok = query.any(-1, keepdim=True)
    assert not bool(row_ok.all())  # the empty row is exercised
    ref = [F.scaled_dot_product_attention(x[0], x[2], x[3], attn_mask=content, enable_gqa=gqa),
           F.scaled_dot_product_attention(x[1], x[2], x[3], attn_mask=query | ~row_ok, enable_gqa=gqa) * row_ok]
    ref = [r.transpose(1, 2).reshape(b, s, h * d) for r in ref]
    first = rank == 0
    assert (got[1][first] == 0).all()
    grads = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(got, w)), x)
    ref_grads = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(ref, w)), x)
    for a, r in zip([*got, *grads], [*ref, *ref_grads]):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant,span,recompute", [("rope_gqa", False, "none"), ("rope_gqa", True, "selective"),
                                                    ("learned_mha", True, "none"), ("learned_mha", False, "full")])
def test_model_matches_dense_masks_logits_and_grads(variant, span, recompute):
    rank = _ranks(span)
    labels = torch.randint(0, VOCAB, rank.shape, generator=torch.Generator().manual_seed(4))
    model = build_model(_plm_cfg(variant, activation_checkpointing=recompute), VOCAB)
    ref_logits, ref_grads = _run(model, labels, _inputs(rank, dense=True))
    logits, grads = _run(model, labels, _inputs(rank, dense=False))
    torch.testing.assert_close(logits[..., :VOCAB], ref_logits[..., :VOCAB], atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys() and "embedding.query" in grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=0, msg=n)


def test_content_stream_alone_matches_dense_masks():
    """two_stream=False (the content stream's logits, no query stream) by order equals the dense content mask."""
    rank = _ranks(True)
    labels = torch.randint(0, VOCAB, rank.shape, generator=torch.Generator().manual_seed(4))
    model = build_model(_plm_cfg("rope_gqa", activation_checkpointing="selective"), VOCAB)
    ref_logits, ref_grads = _run(model, labels, {**_inputs(rank, dense=True), "two_stream": False})
    logits, grads = _run(model, labels, {**_inputs(rank, dense=False), "two_stream": False})
    torch.testing.assert_close(logits[..., :VOCAB], ref_logits[..., :VOCAB], atol=1e-5, rtol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=0, msg=n)


def test_query_stream_projects_only_its_queries():
    """project_query (g's q without the k, v it never uses) equals project's q, RoPE included."""
    model = build_model(_plm_cfg("rope_gqa"), VOCAB)
    att = model.layers[0].attention
    ctx, qctx = contexts(model.m, 2, S, torch.device("cpu"), torch.float32, {"order_rank": _ranks(False, b=2)})
    x = torch.randn(2, S, model.m.hidden_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(att.project_query(x, qctx), att.project(x, qctx)[0], atol=1e-6, rtol=0)


def test_attention_dropout_runs_and_is_seeded():
    """Dropout > 0 on the order path: finite, different from eval, the same for the same seed (its RNG
    stream draws in factorisation order, so it is not the dense path's mask)."""
    cfg = _plm_cfg("rope_gqa")
    cfg = _order(cfg, attention_dropout=0.3)
    model = build_model(cfg, VOCAB)
    kw = _inputs(_ranks(False), dense=False)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        outs.append(model(**kw))
    assert torch.isfinite(outs[0][..., :VOCAB]).all() and torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], model.eval()(**kw))


def test_plm_training_by_order_matches_dense_mask_losses():
    """The objective's own batches (order_rank) vs the same batches with dense masks: 5 AdamW steps, fp32."""
    from tests.objectives.test_plm import gpt_samples, plm_cfg

    tok = ToyTokenizer()
    cfg = _order(plm_cfg(plm_span_order=True, plm_k=2))
    obj = build_objective(cfg, tok)
    assert "order_rank" in obj.inputs(obj.collate(gpt_samples(1, np.random.default_rng(0)), np.random.default_rng(0)))
    runs = []
    for dense in (False, True):
        model = build_model(cfg, tok.vocab_size)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(5):
            batch = obj.collate(gpt_samples(4, np.random.default_rng(step)), np.random.default_rng(100 + step))
            kw = obj.inputs(batch)
            if dense:
                kw = _inputs(kw.pop("order_rank"), dense=True) | {k: kw[k] for k in ("input_ids", "position_ids")}
            loss = obj.loss(model(**kw), obj.targets(batch))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs.append(losses)
    assert runs[0][-1] < runs[0][0]
    for a, b in zip(*runs):
        assert abs(a - b) < 1e-5, runs


def test_pipeline_layers_carry_the_order_ranks():
    """The order ranks travel in the pipeline's input tuple: stage-by-stage logits equal build_model's."""
    names = ("input_ids", "position_ids", "order_rank")
    cfg = _plm_cfg("rope_gqa")
    kw = _inputs(_ranks(True, b=2), dense=False)
    ref = build_model(cfg, VOCAB)(**kw)
    layers, _ = build_sequential(pipeline_layers(cfg, VOCAB, names))
    x = tuple(kw[n] for n in names)
    for layer in layers:
        x = layer(x)
    torch.testing.assert_close(x[..., :VOCAB], ref[..., :VOCAB], atol=0, rtol=0)


def test_plm_at_seq_8192_allocates_nothing_of_s_squared():
    """The objective's batch through a 1-layer model (default config: auto), forward and backward: the largest
    single allocation is far below an [s, s] bool (67 MB), and the layout every layer shares is a few int64 per
    token. The old path (two dense [b, 1, s, s] masks from the collate; 256 MB inside SDPA) fails this."""
    from torch.profiler import profile

    from tests.objectives.test_plm import plm_cfg

    s = 8192
    raw = plm_cfg().to_dict()
    raw["model"].update(num_layers=1, hidden_size=16, num_heads=2, seq_length=s)
    cfg = C.from_dict(raw)
    tok = ToyTokenizer()
    obj = build_objective(cfg, tok)
    model = build_model(cfg, tok.vocab_size)
    samples = [{"tokens": np.random.default_rng(0).integers(7, 120, size=s + 1)}]
    with profile(profile_memory=True) as prof:
        batch = obj.collate(samples, np.random.default_rng(1))
        obj.loss(model(**obj.inputs(batch)), obj.targets(batch)).backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest < s * s // 8, biggest  # the largest is the logits (s x vocab); dense masks: 256 MB
    ctx, _ = contexts(cfg.model, 1, s, torch.device("cpu"), torch.float32, obj.inputs(batch))
    layout = sum(t.numel() * t.element_size() for t in vars(ctx.order).values())
    assert ctx.mask is None and layout <= 2 * 8 * s + 8, layout


def _tp_order_vs_dense(rank_, world_size):
    rank = _ranks(True, b=2)
    labels = torch.randint(0, VOCAB, rank.shape, generator=torch.Generator().manual_seed(4))
    state.destroy()
    ref_logits, ref_grads = _run(build_model(_plm_cfg("rope_gqa"), VOCAB), labels, _inputs(rank, dense=True))
    worst = {}
    for sp in (False, True):
        state.initialize(world_size, 1, sequence_parallel=sp)
        try:
            model = build_model(_plm_cfg("rope_gqa", world_size, sp), VOCAB)
            logits, grads = _run(model, labels, _inputs(rank, dense=False))
            per = logits.size(-1)
            ref = ref_logits[..., rank_ * per:(rank_ + 1) * per]
            err = (logits - ref).nan_to_num(posinf=0, neginf=0).abs().max()
            for n, p in model.named_parameters():
                r = ref_grads[n]
                if getattr(p, "tensor_model_parallel", False):
                    r = shard(r, p.partition_dim, p.partitions, rank_, world_size)
                err = max(err, (grads[n] - r).abs().max())
            worst[f"sp={sp}"] = float(err)
        finally:
            state.destroy()
    return worst


@pytest.mark.slow
def test_order_path_at_tp2_matches_dense_single_rank():
    for worst in run_ranks(_tp_order_vs_dense, 2):
        assert len(worst) == 2 and max(worst.values()) < 1e-5, worst
