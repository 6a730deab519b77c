"""Operational environment variables: read through megalm.environment only, with the documented defaults."""

import ast
import os

import pytest

from megalm import environment
from tests.sources import python_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# distributed.discover translates the launchers' own variables into RANK & co. (its documented job).
ALLOWED = {("megalm/environment.py", None), ("megalm/distributed.py", "discover")}


def _environ_reads(path):
    """(line, enclosing function) of every os.environ / os.getenv read in a file; writes are not reads."""
    tree = ast.parse(open(path).read(), path)
    found = []

    def visit(node, func):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Subscript) for t in node.targets):
            for t in node.targets:  # os.environ["X"] = ... sets a child's or a library's variable
                visit(t.slice, func)
            visit(node.value, func)
            return
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            found.append((node.lineno, func))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, None)
    return found


def _setdefault_lines(path):
    """os.environ.setdefault(...) as a statement only sets a variable for a library: not a read."""
    tree = ast.parse(open(path).read(), path)
    return {n.lineno for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
            and isinstance(n.value.func, ast.Attribute) and n.value.func.attr in ("setdefault", "update")}


def test_environment_is_read_in_one_place():
    offenders = []
    for path in python_files(os.path.join(ROOT, "megalm")):
        rel = os.path.relpath(path, ROOT)
        writes = _setdefault_lines(path)
        for line, func in _environ_reads(path):
            if line not in writes and (rel, None) not in ALLOWED and (rel, func) not in ALLOWED:
                offenders.append(f"{rel}:{line} ({func})")
    assert not offenders, f"read these through megalm.environment (add an accessor there): {offenders}"


def test_rank_defaults_outside_a_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert (environment.rank(), environment.world_size(), environment.local_rank()) == (0, 1, 0)
    assert environment.local_world_size() == 1
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (environment.rank(), environment.world_size(), environment.local_rank()) == (5, 8, 1)


@pytest.mark.parametrize("env,expected", [
    ({"WORLD_SIZE": "4"}, 4),  # the deepspeed launcher sets no LOCAL_WORLD_SIZE: the world shares the node
    ({"WORLD_SIZE": "8", "SLURM_NTASKS_PER_NODE": "4(x2)"}, 4),
    ({"WORLD_SIZE": "8", "SLURM_NTASKS_PER_NODE": "4", "LOCAL_WORLD_SIZE": "2"}, 2),
])
def test_local_world_size(monkeypatch, env, expected):
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert environment.local_world_size() == expected


def test_slurm_and_megalm_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert environment.slurm_ntasks() == 16
    monkeypatch.setenv("SLURM_NTASKS", "16(x2)")
    assert environment.slurm_ntasks() is None
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    monkeypatch.delenv("SLURM_STEP_NODELIST", raising=False)
    assert environment.slurm_nodelist() == "node[1-2]"
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node2")
    assert environment.slurm_nodelist() == "node2"
    monkeypatch.setenv("MEGALM_CACHE", str(tmp_path))
    assert environment.cache_dir() == str(tmp_path)
    monkeypatch.delenv("MEGALM_CACHE")
    assert environment.cache_dir().endswith(os.path.join(".cache", "megalm"))
    monkeypatch.setenv("MEGALM_NO_NATIVE", "1")
    assert environment.native_disabled()
    monkeypatch.setenv("MEGALM_NO_NATIVE", "0")
    assert not environment.native_disabled()
