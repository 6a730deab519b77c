"""Imports only go down: no import cycle among megalm's modules, counting imports inside functions too.

A function-level import still makes two modules depend on each other (it only
defers the failure to run time), so both kinds are edges. ``import a.b`` and
``from a import b`` point at the module they name (a package's ``__init__`` when
the name is not a submodule); the parent packages Python also runs are not edges.
"""

import ast
import os

import pytest

from tests.sources import python_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(root: str, package: str) -> dict[str, str]:
    out = {}
    for path in python_files(os.path.join(root, package)):
        name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph(root: str, package: str) -> dict[str, set[str]]:
    mods = modules(root, package)

    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        here = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in map(owner, targets) if t and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] when the graph has none (iterative DFS, sorted for stable output)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if start in state:
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return []


def test_megalm_has_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT, "megalm"))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("second", [
    "def f():\n    from pkg.sub import a\n",  # a function-level import closes the loop
    "from .sub.a import VALUE\n",  # a relative one
    "from pkg.sub import a as alias\n",  # a submodule named in a from-import
])
def test_cycles_through_any_kind_of_import_are_found(tmp_path, second):
    _write(tmp_path, "pkg/__init__.py", "")
    _write(tmp_path, "pkg/sub/__init__.py", "")
    _write(tmp_path, "pkg/sub/a.py", "from pkg import b\nVALUE = 1\n")
    _write(tmp_path, "pkg/b.py", second)
    assert find_cycle(import_graph(str(tmp_path), "pkg")) == ["pkg.b", "pkg.sub.a", "pkg.b"]


def test_downward_imports_are_no_cycle(tmp_path):
    _write(tmp_path, "pkg/__init__.py", "")
    _write(tmp_path, "pkg/a.py", "import pkg.b\nfrom pkg import c\n")
    _write(tmp_path, "pkg/b.py", "from pkg.c import X\n")
    _write(tmp_path, "pkg/c.py", "import os\nX = 1\n")
    assert find_cycle(import_graph(str(tmp_path), "pkg")) == []


def longest_functions(package_dir: str) -> list[tuple[int, str]]:
    """(lines, 'file:function') of every function under ``package_dir``, longest first."""
    out = []
    for path in python_files(package_dir):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        out += [(node.end_lineno - node.lineno + 1, f"{os.path.relpath(path, ROOT)}:{node.name}")
                for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return sorted(out, reverse=True)


def test_no_long_functions_in_training():
    """A function of training/ fits on a screen (~60 lines); a longer one is doing several jobs."""
    longest = longest_functions(os.path.join(ROOT, "megalm", "training"))
    assert longest[0][0] <= 60, longest[:3]
