"""train.compile: modes resolve per device, compiled blocks compute what eager does, failures fall back once,
and the run's config.yaml records the mode (the default one trains like eager)."""

import logging
import os

import pytest
import torch

import megalm.config as C
from megalm.errors import ConfigError
from megalm.build import build_model
from megalm.model.compile import FASTEST, apply_compile, resolve_compile
from megalm.parallel import compiled_ops
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.parallel.tp_check import VOCAB, make_batch, make_cfg
from tests.training.conftest import losses, run_pretrain, tiny_data  # noqa: F401  (fixture re-used)


def test_auto_resolves_to_the_devices_fastest_mode_and_bad_modes_are_named():
    assert resolve_compile("auto", "cpu") == FASTEST["cpu"] and resolve_compile("none", "cpu") == "none"
    assert resolve_compile("auto", "cuda") == FASTEST["cuda"]
    with pytest.raises(ConfigError, match="train.compile"):
        resolve_compile("fast", "cpu")
    with pytest.raises(ConfigError, match="train.compile"):
        C.from_dict({"train": {"compile": "fast"}})


def _loss_and_grads(mode: str, variant: str = "llama"):
    try:
        model = apply_compile(build_model(make_cfg(variant), VOCAB), mode)
        b = make_batch(variant)
        loss = vocab_parallel_cross_entropy(model(**b["kwargs"]), b["labels"]).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    finally:
        compiled_ops.enable(False)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    torch._dynamo.reset()
    l0, g0 = _loss_and_grads("none")
    l1, g1 = _loss_and_grads("blocks")
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4)


def test_a_block_that_fails_to_compile_runs_eagerly_with_one_warning(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler")
        return run

    l0, g0 = _loss_and_grads("none")
    monkeypatch.setattr(torch, "compile", broken_compile)
    import megalm.model.compile as mc

    monkeypatch.setattr(mc, "_warned", [])
    with caplog.at_level(logging.WARNING, logger="megalm.model.compile"):
        model = apply_compile(build_model(make_cfg("llama"), VOCAB), "blocks")
        compiled_ops.enable(False)
        b = make_batch("llama")
        for _ in range(2):
            loss = vocab_parallel_cross_entropy(model(**b["kwargs"]), b["labels"]).mean()
    assert sum("compiling a block failed" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(loss.detach(), l0)
    assert set(model.state_dict()) == set(g0)  # parameter names untouched


@pytest.mark.slow
def test_default_compile_is_written_to_config_yaml_and_trains_like_eager(tiny_data, tmp_path):  # noqa: F811
    """The default (auto) resolves to the CPU's mode in config.yaml; its losses equal eager's (fp32)."""
    sets = ["train.iters=4", "model.hidden_size=128"]
    _, eager, _ = run_pretrain(tiny_data, tmp_path / "eager", launcher="python",
                               overrides=sets + ["train.compile=none"])
    _, default, _ = run_pretrain(tiny_data, tmp_path / "default", launcher="python",
                                 overrides=sets + ["train.compile=auto"])
    written = C.load(os.path.join(str(tmp_path / "default"), "config.yaml"))
    assert written.train.compile == FASTEST["cpu"] != "auto"
    assert C.load(os.path.join(str(tmp_path / "eager"), "config.yaml")).train.compile == "none"
    a, b = losses(eager), losses(default)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
