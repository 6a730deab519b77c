"""benchmarks/train_step.py runs end to end and reports the numbers the issue asks for."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_step_benchmark_reports_json():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--layers", "1", "--hidden", "64",
           "--heads", "4", "--kv-heads", "2", "--ffn", "128", "--vocab", "256", "--seq", "32", "--batch", "2",
           "--pos", "rope", "--norm", "rmsnorm", "--act", "swiglu", "--no-bias", "--untied", "--dtype", "bf16",
           "--steps", "1", "--warmup", "1", "--compile", "none", "--compare-hf", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    result = json.loads(line)
    assert result["tokens_per_sec"] > 0 and result["hf_tokens_per_sec"] > 0 and result["tflops"] > 0
    # 1 block: qkv 64x(64+2x32) + out 64x64 + fc1 64x256 + fc2 128x64 + 2 norms; embedding + untied head 256x64 each
    assert result["params"] == 64 * 128 + 64 * 64 + 64 * 256 + 128 * 64 + 2 * 64 + 64 + 2 * 256 * 64
