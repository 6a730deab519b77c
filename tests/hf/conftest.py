"""Shared fixtures for the HF interop tests: checkpoints made from build_model weights (fast), a tokenizer,
and exports of them. Trained checkpoints at TP/PP layouts live in test_layouts.py (slow)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.training.conftest import run_pretrain, tiny_data  # noqa: F401  (fixtures re-used)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB_PIECES = 600  # tiny_data's tokenizer
BASE = dict(num_layers=2, hidden_size=64, num_heads=4, seq_length=32, make_vocab_size_divisible_by=16,
            init_std=0.1)
KINDS = {
    "llama": (dict(position="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=2, tie_embeddings=False,
                   rope_base=5000.0), {}),
    "llama_tied": (dict(position="rope", norm="rmsnorm", activation="swiglu"), {}),
    "gpt2": (dict(position="learned", norm="layernorm", activation="gelu", bias=True), {}),
    "bert": (dict(arch="bert", position="learned", norm="layernorm", activation="gelu", bias=True,
                  norm_position="post"), {"name": "mlm"}),
    "plm": (dict(position="rope", norm="layernorm", activation="gelu", bias=True), {"name": "plm"}),
    "plm_swiglu": (dict(position="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=2, rope_base=20000.0),
                   {"name": "plm"}),
}


def make_cfg(kind: str, tokenizer: str, **model):
    from megalm.config import from_dict

    m, obj = KINDS[kind]
    return from_dict({"model": {**BASE, **m, **model}, "objective": obj, "data": {"tokenizer": tokenizer},
                      "train": {"seed": 7}})


def perturbed_weights(cfg, vocab: int) -> dict:
    """build_model's weights with norms/biases moved off 1/0, so a dropped tensor cannot hide."""
    from megalm.build import build_model

    sd = build_model(cfg, vocab).state_dict()
    g = torch.Generator().manual_seed(3)
    return {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in sd.items()}


def make_checkpoint(root, kind: str, tokenizer: str, **model) -> str:
    from megalm.training.checkpoint.from_weights import write_checkpoint

    cfg = make_cfg(kind, tokenizer, **model)
    write_checkpoint(str(root), cfg, VOCAB_PIECES, perturbed_weights(cfg, VOCAB_PIECES), tokenizer_path=tokenizer)
    return str(root)


@pytest.fixture(scope="session")
def tok_model(tiny_data):  # noqa: F811
    return tiny_data[0]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tok_model):
    """kind -> (checkpoint root, HF export dir), built once per session."""
    from megalm.hf.export import export

    out = {}
    base = tmp_path_factory.mktemp("hf_exports")
    for kind in KINDS:
        ckpt = make_checkpoint(base / f"ckpt_{kind}", kind, tok_model)
        hf_dir = str(base / f"hf_{kind}")
        export(ckpt, hf_dir, max_shard_size="100KB" if kind == "llama" else "5GB")
        out[kind] = (ckpt, hf_dir)
    return out


def megalm_model(ckpt: str):
    """(model at TP=1 in eval mode, cfg, vocab) from a checkpoint of any layout."""
    from megalm.generate import load_model

    model, cfg, vocab, _ = load_model(ckpt)
    return model, cfg, vocab


HELD_OUT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
            "want of a wife.\nHowever little known the feelings or views of such a man may be on his first entering "
            "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
            "considered as the rightful property of some one or other of their daughters. 1813, 42 pages.")


def held_out_ids(tokenizer: str, n: int = 24, batch: int = 2) -> torch.Tensor:
    """[batch, n] token ids of text the tiny tokenizer (trained on KJV) never saw."""
    from megalm.data.tokenizer import Tokenizer

    ids = Tokenizer(tokenizer).encode(HELD_OUT)
    return torch.tensor([ids[b * n:(b + 1) * n] for b in range(batch)])


@torch.no_grad()
def plm_content_logits(model, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """megalm's PLM content stream under full attention (what an encoder export reproduces), unpadded vocab."""
    from megalm.model.context import contexts
    from megalm.model.gpt import default_position_ids

    full = torch.ones(ids.size(0), 1, ids.size(1), ids.size(1), dtype=torch.bool)
    pos = default_position_ids(ids)
    ctx, _ = contexts(model.m, ids.size(0), ids.size(1), ids.device, torch.float32,
                      dict(position_ids=pos, content_mask=full, query_mask=full))
    h = model.embedding(ids, pos)
    for layer in model.layers:
        h = layer.step(h, ctx)
    return model.logits(h)[..., :vocab]
