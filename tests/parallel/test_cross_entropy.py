"""Vocab-parallel cross-entropy equals F.cross_entropy on the gathered logits, gradients included."""

import pytest
import torch
import torch.nn.functional as F

from megalm.parallel import state
from megalm.parallel.cross_entropy import _VocabParallelCE, vocab_parallel_cross_entropy
from tests.harness import run_ranks


def _data(v=48, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (2, 5), generator=g)
    labels[0, 1] = -100
    return logits, labels


def _reference(logits, labels, smoothing):
    x = logits.detach().float().requires_grad_()
    loss = F.cross_entropy(x.flatten(0, 1), labels.flatten(), reduction="none", label_smoothing=smoothing)
    loss = loss.view(labels.shape)
    w = torch.arange(1, labels.numel() + 1, dtype=torch.float32).view(labels.shape)  # a non-uniform upstream grad
    (loss * w).sum().backward()
    return loss.detach(), x.grad, w


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("path", ["public", "sharded-kernel"])
def test_single_rank_matches_torch(smoothing, path):
    logits, labels = _data()
    ref_loss, ref_grad, w = _reference(logits, labels, smoothing)
    x = logits.clone().requires_grad_()
    if path == "public":
        loss = vocab_parallel_cross_entropy(x, labels, label_smoothing=smoothing)
    else:  # the multi-rank code path, run on one rank
        loss = _VocabParallelCE.apply(x, labels, smoothing, -100)
    (loss * w).sum().backward()
    assert loss.shape == labels.shape and loss[0, 1] == 0.0
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, ref_grad, atol=1e-6, rtol=1e-6)


def test_padded_columns_are_excluded_from_smoothing():
    logits, labels = _data(v=40)
    labels = labels.clamp(min=0)
    padded = torch.cat([logits, torch.full((2, 5, 8), float("-inf"))], dim=-1).requires_grad_()
    loss = vocab_parallel_cross_entropy(padded, labels, label_smoothing=0.1)
    ref, _, _ = _reference(logits, labels, 0.1)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(padded.grad).all() and padded.grad[..., 40:].abs().max() == 0


def test_bf16_logits_use_fp32_math():
    logits, labels = _data(dtype=torch.bfloat16)
    ref, _, _ = _reference(logits, labels, 0.0)
    x = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def _sharded(rank, world_size):
    state.initialize(world_size, 1)
    out = []
    for smoothing in (0.0, 0.1):
        logits, labels = _data()
        ref_loss, ref_grad, w = _reference(logits, labels, smoothing)
        per = logits.size(-1) // world_size
        x = logits[..., rank * per:(rank + 1) * per].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, labels, label_smoothing=smoothing)
        (loss * w).sum().backward()
        out.append(((loss - ref_loss).abs().max().item(),
                    (x.grad - ref_grad[..., rank * per:(rank + 1) * per]).abs().max().item()))
    return out


@pytest.mark.slow
def test_vocab_parallel_matches_gathered_cross_entropy():
    for rank_result in run_ranks(_sharded, 2):
        for loss_err, grad_err in rank_result:
            assert loss_err < 1e-5 and grad_err < 1e-5


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_losses_keep_no_fp32_copy_of_bf16_logits(objective):
    """The objectives' loss on bf16 logits: fp32 result equal to the upcast reference, and nothing of the
    logits' size saved for backward in fp32 (an upcast before the loss would save one)."""
    from megalm.objectives.clm import masked_token_loss

    logits, labels = _data(v=64, dtype=torch.bfloat16)
    labels = labels.clamp(min=0)
    mask = torch.ones(labels.shape)
    mask[0, 2] = 0.0
    saved = []

    def pack(t):
        saved.append((t.numel(), t.dtype))
        return t

    x = logits.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if objective == "clm":
            loss = masked_token_loss(x, labels, mask)
        else:
            from megalm.objectives.mlm import MaskedLM

            mlm = MaskedLM.__new__(MaskedLM)
            mlm.cfg = type("Cfg", (), {"objective": type("O", (), {"binary_head": "none"})()})()
            loss = mlm.loss((x, None), (labels, mask, None))
    loss.backward()
    ref = logits.float().requires_grad_()
    per_token = F.cross_entropy(ref.flatten(0, 1), labels.flatten(), reduction="none")
    ref_loss = (per_token * mask.flatten()).sum() / mask.sum()
    ref_loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad.float(), ref.grad, atol=1e-2 / labels.numel(), rtol=1e-2)  # bf16 grad
    assert not [s for s in saved if s[0] >= logits.numel() and s[1] == torch.float32], saved
