"""megalm/model reads only ModelConfig (and the layout in parallel.state), and its functions stay short."""

import ast
import pathlib
import re

MODEL = pathlib.Path(__file__).resolve().parents[2] / "megalm" / "model"


def test_model_reads_no_training_parallel_or_objective_config():
    hits = [f"{p.name}:{i}" for p in MODEL.glob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"cfg\.(train|parallel|objective)\b|\.name == \"plm\"", line)]
    assert not hits, hits


def test_no_function_in_model_is_over_60_lines():
    long = [f"{p.name}:{n.name} ({n.end_lineno - n.lineno + 1})" for p in MODEL.glob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long
