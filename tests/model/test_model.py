"""Model behaviour on one process: vocabulary padding, masks, init, config errors, TP marks, fused kernels."""

import pytest
import torch

import megalm.config as C
from megalm.errors import ConfigError
from megalm.build import build_model, padded_vocab_size
from megalm.model.context import build_mask
from megalm.parallel import state
from tests.parallel.tp_check import VOCAB, make_batch, make_cfg


def test_padded_vocab_size():
    cfg = C.from_dict({"model": {"make_vocab_size_divisible_by": 128, "num_heads": 4}, "parallel": {"tensor": 2}})
    assert padded_vocab_size(50257, cfg) == 50432  # multiple of 256
    assert padded_vocab_size(256, cfg) == 256
    model = build_model(make_cfg("llama"), VOCAB)
    assert model.vocab_size == VOCAB and model.padded_vocab == 96


def test_padded_logits_never_win():
    model = build_model(make_cfg("llama"), VOCAB)
    with torch.no_grad():
        model.embedding.word.weight[VOCAB:] = 100.0  # even huge padding rows
    logits = model(torch.randint(0, VOCAB, (2, 16)))
    assert torch.isinf(logits[..., VOCAB:]).all()
    assert logits.argmax(-1).max() < VOCAB


def test_init_is_deterministic_and_seeded():
    a = build_model(make_cfg("llama"), VOCAB).state_dict()
    b = build_model(make_cfg("llama"), VOCAB).state_dict()
    c = build_model(make_cfg("llama", seed=8), VOCAB).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["layers.0.attention.qkv.weight"], c["layers.0.attention.qkv.weight"])
    # Megatron's scheme: std 0.02, output projections scaled by 1/sqrt(2 x layers)
    assert abs(a["layers.0.attention.qkv.weight"].std().item() - 0.02) < 0.002
    assert abs(a["layers.0.mlp.fc2.weight"].std().item() - 0.02 / 2.0) < 0.002
    assert torch.equal(a["layers.0.attn_norm.weight"], torch.ones(64))
    assert a["embedding.word.weight"][VOCAB:].abs().max() == 0


def test_segment_ids_isolate_documents():
    """A token's logits depend only on earlier tokens of its own segment."""
    model = build_model(make_cfg("llama"), VOCAB).eval()
    ids = torch.randint(0, VOCAB, (1, 16))
    seg = torch.tensor([[0] * 6 + [1] * 10])
    pos = torch.cat([torch.arange(6), torch.arange(10)]).unsqueeze(0)
    out = model(ids, position_ids=pos, segment_ids=seg)
    alone = model(ids[:, 6:], position_ids=pos[:, 6:])
    torch.testing.assert_close(out[:, 6:, :VOCAB], alone[..., :VOCAB], atol=1e-5, rtol=1e-5)
    changed = ids.clone()
    changed[0, :6] = (changed[0, :6] + 1) % VOCAB
    torch.testing.assert_close(model(changed, position_ids=pos, segment_ids=seg)[:, 6:], out[:, 6:])


def test_arbitrary_mask_is_anded_with_causal_and_empty_rows_are_zero():
    mask = build_mask(1, 4, True, torch.device("cpu"), attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
    assert torch.equal(mask[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    # two-stream PLM: the first query in the factorisation order may see nothing; it must not be NaN
    b = make_batch("plm")
    q = b["kwargs"]["query_mask"].clone()
    q[:, :, 0] = False
    model = build_model(make_cfg("plm"), VOCAB)
    out = model(b["kwargs"]["input_ids"], content_mask=b["kwargs"]["content_mask"], query_mask=q, two_stream=True)
    assert torch.isfinite(out[..., :VOCAB]).all()


def test_bert_padding_keys_are_ignored():
    model = build_model(make_cfg("bert"), VOCAB).eval()
    b = make_batch("bert")["kwargs"]
    logits, binary = model(**b)
    ids = b["input_ids"].clone()
    ids[1, 12:] = 0  # change only padded tokens
    logits2, binary2 = model(ids, token_type_ids=b["token_type_ids"], padding_mask=b["padding_mask"])
    torch.testing.assert_close(logits2[1, :12], logits[1, :12])
    torch.testing.assert_close(binary2, binary)
    assert binary.shape == (2, 2)


def test_tensor_parallel_params_are_marked_for_deepspeed():
    from deepspeed.runtime.utils import is_model_parallel_parameter

    model = build_model(make_cfg("gpt2"), VOCAB)
    marked = {n for n, p in model.named_parameters() if is_model_parallel_parameter(p)}
    assert "layers.0.attention.qkv.weight" in marked and "layers.0.mlp.fc2.weight" in marked
    assert "embedding.word.weight" in marked and "head.weight" in marked
    assert "layers.0.attention.out.bias" not in marked and "layers.0.attn_norm.weight" not in marked


def test_build_model_checks_parallel_state():
    state.destroy()
    with pytest.raises(ConfigError, match="initialize"):
        build_model(make_cfg("llama", tp=2), VOCAB)


def test_two_stream_needs_plm_model():
    model = build_model(make_cfg("llama"), VOCAB)
    b = make_batch("plm")["kwargs"]
    with pytest.raises(ValueError, match="query stream"):
        model(**b)


@pytest.mark.slow
def test_fused_kernels_match_eager():
    from megalm.parallel import compiled_ops
    from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy

    torch._dynamo.reset()
    results = []
    for on in (False, True):
        compiled_ops.enable(on)
        try:
            model = build_model(make_cfg("llama"), VOCAB)
            b = make_batch("llama")
            loss = vocab_parallel_cross_entropy(model(**b["kwargs"]), b["labels"]).mean()
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        finally:
            compiled_ops.enable(False)
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4)


def test_inputs_are_named_and_a_misspelt_one_is_refused():
    model = build_model(make_cfg("llama"), VOCAB)
    ids = torch.randint(0, VOCAB, (1, 16))
    with pytest.raises(ValueError, match="segment_id'.*segment_ids"):
        model(ids, segment_id=torch.zeros(1, 16, dtype=torch.long))
