"""A step's loss and objective metrics are averaged over micro-batches in one reduction and come back as floats."""

from types import SimpleNamespace

import torch

from megalm.training.step import StepRunner


def test_loss_and_metrics_are_micro_batch_means_as_floats():
    runner = StepRunner(SimpleNamespace(dp_size=1), objective=None, grad_accum=2, device=torch.device("cpu"))
    losses = [torch.tensor(1.0), torch.tensor(3.0)]
    extras = {"mlm_loss": [torch.tensor(2.0), torch.tensor(4.0)], "binary_acc": [torch.tensor(0.0), torch.tensor(1.0)]}
    r = runner._reduce(losses, extras, tokens=10)
    assert r.loss == 2.0 and r.tokens == 10
    assert r.metrics == {"binary_acc": 0.5, "mlm_loss": 3.0}
    assert all(type(v) is float for v in (r.loss, *r.metrics.values()))
