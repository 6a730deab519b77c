"""pipeline_layers run one after another in one process give build_model's logits and grads (same seed)."""

import pytest
import torch

from megalm.build import build_model, pipeline_layers
from megalm.model.pipeline import pipeline_name_prefixes
from megalm.model.recompute import apply_recompute
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.harness import run_ranks
from tests.parallel.tp_check import VOCAB, make_batch, make_cfg


def build_sequential(specs):
    """What DeepSpeed's PipelineModule does on one stage: build each spec, tied ones once."""
    built, layers, modules = {}, [], []
    for spec in specs:
        key = getattr(spec, "key", None)
        if key is not None and key in built:
            mod, fn = built[key], spec.forward_fn
            layers.append(lambda x, mod=mod, fn=fn: fn(mod, x))
            modules.append(None)
            continue
        mod = spec.build()
        if key is not None:
            built[key] = mod
        layers.append(mod)
        modules.append(mod)
    return layers, modules


CASES = {
    "llama": ("input_ids", "position_ids", "segment_ids"),
    "gpt2": ("input_ids",),
    "post_ln_sinusoidal": ("input_ids", "position_ids"),
    "bert": ("input_ids", "token_type_ids", "padding_mask"),
    "plm": ("input_ids", "position_ids", "content_mask", "query_mask"),
}


@pytest.mark.parametrize("variant", list(CASES))
@pytest.mark.parametrize("ckpt", ["none", "full"])
def test_pipeline_layers_match_model(variant, ckpt):
    cfg = make_cfg(variant, activation_checkpointing=ckpt)
    batch = make_batch(variant)
    kw = dict(batch["kwargs"])
    kw.pop("two_stream", None)
    kw.setdefault("position_ids", torch.arange(16).expand(2, 16))
    names = CASES[variant]
    model = build_model(cfg, VOCAB)
    model_kw = {n: kw[n] for n in names}
    if variant == "plm":
        model_kw["two_stream"] = True
    out = model(**model_kw)
    ref = out if torch.is_tensor(out) else out[0]

    specs = pipeline_layers(cfg, VOCAB, names)
    assert len(specs) == cfg.model.num_layers + 3
    layers, modules = build_sequential(specs)
    for mod in modules:  # what the engine does to the built PipelineModule
        if mod is not None:
            apply_recompute(mod, ckpt)
    x = tuple(kw[n] for n in names)
    for layer in layers:
        x = layer(x)
    logits = x if torch.is_tensor(x) else x[0]
    torch.testing.assert_close(logits[..., :VOCAB], ref[..., :VOCAB], atol=0, rtol=0)
    assert torch.isinf(logits[..., VOCAB:]).all()
    if not torch.is_tensor(out) and out[1] is not None:
        torch.testing.assert_close(x[1], out[1], atol=0, rtol=0)

    vocab_parallel_cross_entropy(ref, batch["labels"]).mean().backward()
    vocab_parallel_cross_entropy(logits, batch["labels"]).mean().backward()
    ref_params = dict(model.named_parameters())
    seen = set()
    for mod, prefix in zip(modules, pipeline_name_prefixes(cfg)):
        if mod is None:
            continue
        for n, p in mod.named_parameters():
            full = prefix + n
            assert full in ref_params, f"pipeline param {n} (layer prefix {prefix!r}) has no model counterpart"
            torch.testing.assert_close(p, ref_params[full], atol=0, rtol=0)
            if ref_params[full].grad is not None:
                torch.testing.assert_close(p.grad, ref_params[full].grad, atol=1e-6, rtol=1e-5)
            seen.add(full)
    assert seen == set(ref_params)


def test_default_inputs_follow_objective():
    from megalm.build import default_inputs

    assert default_inputs(make_cfg("llama")) == ("input_ids", "position_ids")
    assert default_inputs(make_cfg("plm"))[-1:] == ("order_rank",)
    assert default_inputs(make_cfg("bert")) == ("input_ids", "token_type_ids", "padding_mask")


def _deepspeed_pipeline_loss(rank, world_size, variant):
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megalm.parallel import state
    from megalm.parallel.random import model_parallel_seed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    tp = world_size // 2
    names = CASES[variant]
    batch = make_batch(variant)
    kw = dict(batch["kwargs"])
    kw.setdefault("position_ids", torch.arange(16).expand(2, 16).contiguous())
    ref_kw = {n: kw[n] for n in names}
    if variant == "plm":
        ref_kw["two_stream"] = True
    out = build_model(make_cfg(variant), VOCAB)(**ref_kw)
    ref = vocab_parallel_cross_entropy(out if torch.is_tensor(out) else out[0], batch["labels"]).mean().item()

    def loss_fn(output, labels):
        return vocab_parallel_cross_entropy(output if torch.is_tensor(output) else output[0], labels).mean()

    state.initialize(tp, 2)  # the layers are built TP-sharded, before the engine exists
    model_parallel_seed(1)
    module = PipelineModule(layers=pipeline_layers(make_cfg(variant, tp=tp), VOCAB, names), loss_fn=loss_fn,
                            topology=PipeModelDataParallelTopology(num_pp=2, num_mp=tp, num_dp=1))
    state.initialize_from_grid(module._grid)
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "gradient_clipping": 0.0, "optimizer": {"type": "Adam", "params": {"lr": 0.0}},
          "steps_per_print": 10**9, "pipeline": {"use_reentrant": False}}
    engine, *_ = deepspeed.initialize(model=module, config=ds, model_parameters=list(module.parameters()))
    loss = engine.eval_batch(iter([(tuple(kw[n] for n in names), batch["labels"])]))
    state.destroy()
    return float(loss), ref


@pytest.mark.slow
def test_deepspeed_pipeline_engine_runs_the_specs():
    """PP=2 x TP=2 through DeepSpeed's engine: the PLM tuple (g stream, bool masks) crosses stages intact."""
    for loss, ref in run_ranks(_deepspeed_pipeline_loss, 4, "plm"):
        assert abs(loss - ref) < 1e-5
