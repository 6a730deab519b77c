"""RNG tracker: dropout equal where activations are replicated, different where split, and reproduced
under activation recomputation (grads bit-identical to no checkpointing)."""

import pytest
import torch
import torch.nn.functional as F

from megalm.build import build_model
from megalm.parallel import state
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalm.parallel.random import checkpoint, get_tracker, model_parallel_seed
from tests.harness import run_ranks
from tests.parallel.tp_check import VOCAB, make_batch, make_cfg


def test_fork_uses_its_own_stream_and_restores_default():
    model_parallel_seed(5)
    a = torch.rand(3)
    model_parallel_seed(5)
    with get_tracker().fork():
        forked = torch.rand(3)
    b = torch.rand(3)
    assert torch.equal(a, b), "fork must not advance the default stream"
    assert not torch.equal(forked, a)


def test_checkpoint_replays_dropout():
    model_parallel_seed(1)
    x = torch.randn(4, 8, requires_grad=True)

    def f(t):
        with get_tracker().fork():
            t = F.dropout(t, 0.5, True)
        return F.dropout(t * 2, 0.5, True)

    model_parallel_seed(2)
    y_ref = f(x)
    y_ref.sum().backward()
    g_ref = x.grad.clone()
    x.grad = None
    model_parallel_seed(2)
    y = checkpoint(f, x)
    torch.rand(5)  # move the streams on before backward: recompute must rewind them
    with get_tracker().fork():
        torch.rand(5)
    y.sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(x.grad, g_ref)


def _grads(variant, mode, tp=1, sp=False):
    cfg = make_cfg(variant, tp, sp, activation_checkpointing=mode)
    cfg = cfg.replace(model=type(cfg.model)(**{**cfg.model.__dict__, "hidden_dropout": 0.1,
                                               "attention_dropout": 0.1}))
    model = build_model(cfg, VOCAB)
    model.train()
    batch = make_batch(variant)
    model_parallel_seed(11)
    out = model(**batch["kwargs"])
    logits = out[0] if isinstance(out, tuple) else out
    loss = vocab_parallel_cross_entropy(logits, batch["labels"]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["llama", "bert", "plm"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_is_bit_identical(variant, mode):
    loss_ref, ref = _grads(variant, "none")
    loss, got = _grads(variant, mode)
    assert torch.equal(loss, loss_ref)
    for n in ref:
        assert torch.equal(ref[n], got[n]), n


def test_dropout_is_active_and_seeded():
    a, _ = _grads("llama", "none")
    b, _ = _grads("llama", "none")
    cfg = make_cfg("llama")
    model = build_model(cfg, VOCAB).eval()
    batch = make_batch("llama")
    c = vocab_parallel_cross_entropy(model(**batch["kwargs"]), batch["labels"]).mean().detach()
    assert torch.equal(a, b), "same seed, same dropout"
    assert not torch.allclose(a, c), "training with dropout must differ from eval"


def _tp_dropout(rank, world_size):
    state.initialize(world_size, 1)
    model_parallel_seed(3)
    default = torch.rand(4)
    with get_tracker().fork():
        split = torch.rand(4)
    out = {"default": default, "split": split}
    for sp in (False, True):
        state.initialize(world_size, 1, sequence_parallel=sp)
        for mode in ("full", "selective"):
            loss_ref, ref = _grads("llama", "none", world_size, sp)
            loss, got = _grads("llama", mode, world_size, sp)
            out[f"{mode}/sp={sp}"] = bool(torch.equal(loss, loss_ref)) and all(torch.equal(ref[n], got[n])
                                                                                 for n in ref)
    state.destroy()
    return out


@pytest.mark.slow
def test_tensor_parallel_dropout_streams_and_recompute():
    r0, r1 = run_ranks(_tp_dropout, 2)
    assert torch.equal(r0["default"], r1["default"]), "replicated regions need the same dropout on every TP rank"
    assert not torch.equal(r0["split"], r1["split"]), "split regions need different dropout per TP rank"
    for key in ("full/sp=False", "selective/sp=False", "full/sp=True", "selective/sp=True"):
        assert r0[key] and r1[key], key


def _stage_masks(monkeypatch, stage: int) -> tuple:
    monkeypatch.setattr(state, "pipeline_rank", lambda: stage)
    model_parallel_seed(7)
    x = torch.ones(64)
    replicated = F.dropout(x, 0.5, True)
    with get_tracker().fork():
        split = F.dropout(x, 0.5, True)
    return replicated, split


def test_pipeline_stages_draw_different_dropout_masks(monkeypatch):
    """Seeds are offset per pipeline rank (Megatron's 100 x stage): stage 1's blocks do not repeat stage 0's masks."""
    first, first_split = _stage_masks(monkeypatch, 0)
    second, second_split = _stage_masks(monkeypatch, 1)
    assert not torch.equal(first, second) and not torch.equal(first_split, second_split)
    again, again_split = _stage_masks(monkeypatch, 1)  # and each stage's streams are reproducible
    assert torch.equal(second, again) and torch.equal(second_split, again_split)
    torch.manual_seed(7)  # stage 0 keeps the plain seed: PP=1 runs draw what they drew before
    assert torch.equal(first, F.dropout(torch.ones(64), 0.5, True))
