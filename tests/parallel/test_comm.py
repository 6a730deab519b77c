"""Collectives are device-correct by construction: every call site goes through megalm.parallel.comm (or the
autograd mappings, which move activations already on the training device), and comm puts values where the
group's backend serves them. An NCCL-only group would reject the CPU flags the loop used to all-reduce."""

from __future__ import annotations

import ast
import os

import pytest
import torch
import torch.distributed as dist

from megalm.parallel import comm
from tests.harness import run_ranks
from tests.sources import python_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier",
    "monitored_barrier", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend",
    "irecv", "batch_isend_irecv",
}
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}
# comm itself, and the TP/SP autograd ops whose inputs are activations on the training device
ALLOWED = {"megalm/parallel/comm.py", "megalm/parallel/mappings.py", "megalm/parallel/cross_entropy.py"}


def collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) for every torch.distributed / deepspeed.comm collective called in ``source``."""
    tree = ast.parse(source)
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(e: ast.expr) -> str:
        if isinstance(e, ast.Name):
            return alias.get(e.id, e.id)
        if isinstance(e, ast.Attribute):
            return f"{dotted(e.value)}.{e.attr}"
        return "?"

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        owner, _, fn = name.rpartition(".")
        # ``dist`` bound any other way (e.g. from sys.modules) counts too
        if fn in COLLECTIVES and (owner in DIST_MODULES or owner.split(".")[-1] == "dist"):
            found.append((node.lineno, name))
    return found


def test_scanner_finds_collectives_however_imported():
    src = ("import torch\nimport torch.distributed as dist\nfrom deepspeed import comm as dc\n"
           "from torch.distributed import all_reduce as ar\n"
           "def f(t, d):\n    dist.all_reduce(t)\n    torch.distributed.barrier()\n    dc.broadcast(t, 0)\n"
           "    ar(t)\n    d.dist.all_gather_object([], 1)\n    comm.any_rank(True)\n    t.all_reduce()\n")
    assert [line for line, _ in collective_calls(src)] == [6, 7, 8, 9, 10]


def test_every_collective_in_megalm_goes_through_comm():
    offenders = []
    for path in python_files(os.path.join(ROOT, "megalm")):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if rel in ALLOWED:
            continue
        with open(path) as fh:
            offenders += [f"{rel}:{line} {call}" for line, call in collective_calls(fh.read())]
    assert not offenders, "collectives outside megalm.parallel.comm (route them through it):\n" + "\n".join(offenders)


@pytest.mark.parametrize("backend, cuda, expected", [
    ("nccl", True, "cuda:1"), ("cpu:gloo,cuda:nccl", True, "cuda:1"), ("gloo", True, "cpu"), ("gloo", False, "cpu"),
])
def test_comm_device_follows_the_backend(monkeypatch, backend, cuda, expected):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert comm.device() == torch.device(expected)


def test_no_process_group_is_one_rank():
    assert comm.device() == torch.device("cpu")
    assert comm.reduce_scalar(torch.tensor(2.5), "mean") == 2.5
    assert comm.any_rank(torch.tensor(True)) and not comm.any_rank(False)
    assert comm.all_gather_object({"a": 1}) == [{"a": 1}]
    comm.barrier()


class _Reached(Exception):
    pass


@pytest.fixture()
def fake_accelerator_group(monkeypatch):
    """A 2-rank group whose backend, like NCCL, serves one device only (``meta`` stands in for CUDA here).

    Every collective records the devices of its tensors; one on another device raises as NCCL does.
    """
    seen: list = []
    served = torch.device("meta")

    def collective(tensor, *args, **kwargs):
        seen.append(tensor.device)
        if tensor.device != served:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        raise _Reached  # the value was on the served device; stop before anything reads a meta tensor

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", collective)
    monkeypatch.setattr(dist, "broadcast", collective)
    monkeypatch.setattr(comm, "device", lambda group=None: served)
    return seen


def test_control_values_are_reduced_on_the_served_device(fake_accelerator_group):
    """The preemption and skip flags, the DP-mean of losses/metrics and the grad norm (today's call sites)."""
    from megalm.training import grad_norm
    from megalm.training.nonfinite import NonFiniteGuard
    from megalm.training.step import dp_mean as _dp_mean
    from megalm.training.stop_rules import Preemption

    preempt = Preemption()
    guard = NonFiniteGuard()
    guard.observe(torch.tensor(float("nan")))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)

    class _Engine:
        dp_size = 2

    calls = [preempt.requested, guard.consume, lambda: _dp_mean(torch.tensor(1.5), _Engine()),
             lambda: _dp_mean(0.25, _Engine()), lambda: grad_norm.global_grad_norm([p]),
             lambda: comm.broadcast_(torch.zeros(2, dtype=torch.long), src=0)]
    try:
        for call in calls:
            with pytest.raises(_Reached):
                call()
    finally:
        preempt.restore()
    assert fake_accelerator_group == [torch.device("meta")] * len(calls)


def _helpers(rank, world_size):
    flag = comm.any_rank(torch.tensor(rank == 1))
    mean = comm.reduce_scalar(torch.tensor(float(rank + 1)), "mean")
    top = comm.reduce_scalar(float(rank), "max")
    nxt = comm.broadcast_(torch.tensor([rank * 10 + 7]), src=1)
    objs = comm.all_gather_object({"rank": rank})
    t = torch.full((2,), float(rank))
    summed = comm.all_reduce(t, "sum")
    return flag, mean, top, int(nxt), objs, summed.tolist(), t.tolist()


@pytest.mark.slow
def test_helpers_on_two_gloo_ranks():
    got = run_ranks(_helpers, 2)
    for rank, (flag, mean, top, nxt, objs, summed, t) in enumerate(got):
        assert flag is True and mean == 1.5 and top == 1.0 and nxt == 17
        assert objs == [{"rank": 0}, {"rank": 1}]
        assert summed == [1.0, 1.0] and t == [float(rank)] * 2  # the input is left as it was
