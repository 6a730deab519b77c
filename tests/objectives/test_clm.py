"""CLM: the loss at position i has zero gradient w.r.t. input tokens after i (and, with reset_attention_mask,
w.r.t. earlier documents)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalm import config as C
from megalm.objectives import build_objective
from tests.objectives.conftest import EmbeddingTap, ToyTokenizer

SEQ = 16


def clm_cfg(**objective) -> C.Config:
    return C.from_dict({
        "model": {"arch": "gpt", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_length": SEQ,
                  "position": "rope", "norm": "rmsnorm", "activation": "swiglu", "tie_embeddings": False,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0, "make_vocab_size_divisible_by": 8},
        "objective": {"name": "clm", **objective},
        "train": {"seed": 5},
    })


@pytest.mark.parametrize("reset", [False, True])
def test_clm_loss_at_i_sees_only_tokens_up_to_i(reset):
    from megalm.build import build_model

    tok = ToyTokenizer()
    cfg = clm_cfg(reset_attention_mask=reset, reset_position_ids=reset)
    obj = build_objective(cfg, tok)
    tokens = np.random.default_rng(0).integers(7, tok.vocab_size, size=(2, SEQ + 1))
    tokens[:, 6] = tok.eod  # a document boundary: the second document starts at position 7
    batch = obj.collate([{"tokens": t} for t in tokens], np.random.default_rng(1))
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    tap = EmbeddingTap(model)
    logits = model(**obj.inputs(batch))
    pos = torch.arange(SEQ)
    for i in range(SEQ):
        loss_i = F.cross_entropy(logits[0, i, :tok.vocab_size][None], batch["labels"][0, i][None])
        (grad,) = torch.autograd.grad(loss_i, tap.leaf, retain_graph=True)
        norm = grad[0].norm(dim=-1)
        seen = pos <= i
        if reset and i >= 7:
            seen &= pos >= 7
        assert (norm[~seen] == 0).all(), f"position {i} sees a later token (or another document)"
        assert (norm[seen] > 1e-9).all(), f"position {i} misses a token it should see"
        assert (grad[1] == 0).all()


def megatron_ltor(data, eod):
    """Megatron's _get_ltor_masks_and_position_ids with every reset on, written out: loop over EODs, dense mask."""
    n = len(data)
    att = np.tril(np.ones((n, n)))
    lm = np.ones(n, np.float32)
    lm[data == eod] = 0.0
    pos = np.arange(n)
    prev = 0
    for i in np.flatnonzero(data == eod):
        att[i + 1:, :i + 1] = 0
        pos[i + 1:] -= i + 1 - prev
        prev = i + 1
    return att > 0.5, lm, pos


@pytest.mark.parametrize("seed", range(5))
def test_document_layout_reproduces_megatron_ltor_masks(seed):
    """CLM's segment ids + positions + EOD loss mask, and the model's mask from them, equal Megatron's (moved here
    from tests/data/test_masks.py with the dead megalm/data/masks.py it tested)."""
    from megalm.model.context import build_mask

    tok = ToyTokenizer()
    obj = build_objective(clm_cfg(reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True), tok)
    text = np.random.default_rng(seed).integers(tok.eod, tok.eod + 4, (1, 65))  # many EODs, adjacent ones too
    batch = obj.collate([{"tokens": text[0]}], np.random.default_rng(0))
    att, lm, pos = megatron_ltor(text[0, :-1], tok.eod)
    np.testing.assert_array_equal(batch["position_ids"][0].numpy(), pos)
    np.testing.assert_array_equal(batch["loss_mask"][0].numpy(), lm)
    mask = build_mask(1, 64, True, torch.device("cpu"), segment_ids=batch["segment_ids"])
    np.testing.assert_array_equal(mask[0, 0].numpy(), att)


def test_an_objective_with_positional_inputs_is_refused_by_name():
    from megalm.errors import ConfigError
    from megalm.objectives.clm import CausalLM

    class OldStyle(CausalLM):
        def inputs(self, batch):
            return batch["input_ids"], batch["position_ids"]

    obj = OldStyle(clm_cfg(), ToyTokenizer())
    batch = obj.collate([{"tokens": np.arange(7, 7 + SEQ + 1)}], np.random.default_rng(0))
    with pytest.raises(ConfigError, match="OldStyle.inputs returned a tuple"):
        obj.inputs(batch)
