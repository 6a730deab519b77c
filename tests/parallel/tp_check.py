"""Shared by the TP tests: run a model variant at TP=1 and at this process's TP degree, compare everything."""

from __future__ import annotations


import torch
import torch.distributed as dist

import megalm.config as C
from megalm.build import build_model
from megalm.tp_shard_rules import tp_rule
from megalm.parallel import state
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalm.parallel.layers import shard

VOCAB = 90  # padded to 96 at TP 1, 2 and 4 (divisible_by 8): same padded table everywhere
TINY = dict(num_layers=2, hidden_size=64, num_heads=4, seq_length=16, make_vocab_size_divisible_by=8)

VARIANTS = {
    "llama": dict(arch="gpt", num_heads=8, num_kv_heads=4),
    "gpt2": dict(arch="gpt", position="learned", norm="layernorm", activation="gelu", bias=True,
                 tie_embeddings=False),
    "post_ln_sinusoidal": dict(arch="gpt", position="sinusoidal", norm_position="post", norm="layernorm"),
    "bert": dict(arch="bert", position="learned", norm="layernorm", norm_position="post", activation="gelu",
                 bias=True),
    "plm": dict(arch="gpt", num_heads=8, num_kv_heads=4),
    "head_mask": dict(arch="gpt", num_heads=8, num_kv_heads=4),
    "alibi": dict(arch="gpt", position="alibi", num_heads=8, num_kv_heads=4),  # per-head slopes split over TP
}


def make_cfg(variant: str, tp: int = 1, sp: bool = False, **train) -> C.Config:
    raw = {"model": {**TINY, **VARIANTS[variant]}, "parallel": {"tensor": tp, "sequence_parallel": sp},
           "train": {"seed": 7, **train}}
    if variant == "plm":
        raw["objective"] = {"name": "plm"}
    return C.from_dict(raw)


def make_batch(variant: str, b: int = 2, s: int = 16) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    if variant == "bert":
        pad = torch.ones(b, s, dtype=torch.bool)
        pad[1, 12:] = False
        types = (torch.arange(s) >= 8).long().expand(b, s)
        return {"kwargs": dict(input_ids=ids, token_type_ids=types, padding_mask=pad), "labels": labels}
    if variant == "plm":
        order = torch.stack([torch.randperm(s, generator=g) for _ in range(b)])
        rank = order.argsort(-1)  # rank[i] = place of token i in the factorisation order
        content = (rank[:, None, :] <= rank[:, :, None]).unsqueeze(1)
        query = (rank[:, None, :] < rank[:, :, None]).unsqueeze(1)
        return {"kwargs": dict(input_ids=ids, content_mask=content, query_mask=query, two_stream=True),
                "labels": labels}
    if variant == "head_mask":  # a different arbitrary mask per head: each TP rank must use its heads' slice
        mask = torch.rand(b, 8, s, s, generator=g) < 0.6
        return {"kwargs": dict(input_ids=ids, attention_mask=mask), "labels": labels}
    seg = torch.zeros(b, s, dtype=torch.long)
    seg[:, 9:] = 1
    return {"kwargs": dict(input_ids=ids, segment_ids=seg), "labels": labels}


def run_model(cfg: C.Config, batch: dict) -> tuple:
    model = build_model(cfg, VOCAB)
    out = model(**batch["kwargs"])
    logits, binary = (out if isinstance(out, tuple) else (out, None))
    loss = vocab_parallel_cross_entropy(logits, batch["labels"]).mean()
    total = loss + (binary.float().square().mean() if binary is not None else 0.0)
    total.backward()
    return model, logits.detach(), loss.detach(), binary


def gather_vocab(shard_: torch.Tensor) -> torch.Tensor:
    if state.tensor_size() == 1:
        return shard_
    parts = [torch.empty_like(shard_) for _ in range(state.tensor_size())]
    dist.all_gather(parts, shard_.contiguous(), group=state.tensor_group())
    return torch.cat(parts, dim=-1)


def compare_variant(variant: str, tp: int, sp: bool, atol: float = 1e-5) -> dict:
    """Max abs differences of logits, loss and every grad between TP=1 and TP=tp (called on every rank)."""
    batch = make_batch(variant)
    state.destroy()
    ref_model, ref_logits, ref_loss, ref_bin = run_model(make_cfg(variant), batch)
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
    state.initialize(tp, 1, sequence_parallel=sp)
    try:
        model, logits, loss, binary = run_model(make_cfg(variant, tp, sp), batch)
        full = gather_vocab(logits)
        diffs = {"logits": (full[..., :VOCAB] - ref_logits[..., :VOCAB]).abs().max().item(),
                 "loss": (loss - ref_loss).abs().item()}
        assert torch.isinf(full[..., VOCAB:]).all() and full[..., VOCAB:].lt(0).all(), "padded logits must be -inf"
        if binary is not None:
            diffs["binary"] = (binary - ref_bin).abs().max().item()
        worst = 0.0
        names = set()
        for n, p in model.named_parameters():
            names.add(n)
            ref = ref_grads[n]
            rule = tp_rule(n, make_cfg(variant, tp, sp), VOCAB)
            marked = (p.partition_dim, p.partitions) if getattr(p, "tensor_model_parallel", False) else None
            assert rule == marked, f"{variant}: tp_rule({n}) = {rule} but the parameter says {marked}"
            if marked is not None:
                ref = shard(ref, p.partition_dim, p.partitions, state.tensor_rank(), tp)
            assert p.grad is not None, f"{variant}: no grad for {n}"
            assert p.grad.shape == ref.shape, f"{variant}: {n} grad {tuple(p.grad.shape)} vs {tuple(ref.shape)}"
            err = (p.grad - ref).abs().max().item()
            assert err < atol, f"{variant} tp={tp} sp={sp}: grad of {n} differs by {err}"
            worst = max(worst, err)
        assert names == set(ref_grads), f"{variant}: parameter names differ from TP=1"
        diffs["grads"] = worst
        for k, v in diffs.items():
            assert v < atol, f"{variant} tp={tp} sp={sp}: {k} differs by {v}"
        return diffs
    finally:
        state.destroy()


