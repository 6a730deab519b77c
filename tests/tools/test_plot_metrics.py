"""tools/plot_metrics.py renders a run's metrics.jsonl to a PNG and names a broken line."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "plot_metrics.py")


def test_renders_png(tmp_path):
    pytest.importorskip("matplotlib")
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 21):
            f.write(json.dumps({"step": s, "loss": 8 - 0.2 * s, "lr": 1e-3, "tokens_per_sec": 1000.0 + s}) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "eval_loss": 8 - 0.2 * s, "eval_ppl": 100.0}) + "\n")
    out = subprocess.run([sys.executable, TOOL, str(tmp_path)], capture_output=True, text=True, check=True).stdout
    png = tmp_path / "metrics.png"
    assert out.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bad_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 1, "tokens_per_sec": 1}\n{oops\n')
    p = subprocess.run([sys.executable, TOOL, str(tmp_path)], capture_output=True, text=True)
    assert p.returncode != 0 and "metrics.jsonl:2" in p.stderr
