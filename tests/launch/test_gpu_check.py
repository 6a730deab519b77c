"""benchmarks/gpu_check.sh and build_gpu_wheels.sh parse, and pass shellcheck where it is installed (.ci/run installs it).

The check itself needs a GPU; `bash benchmarks/gpu_check.sh --cpu-smoke` runs its steps on the CPU (~1-2 min,
not part of the suite).
"""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = [os.path.join(ROOT, "benchmarks", s) for s in ("gpu_check.sh", "build_gpu_wheels.sh")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses_and_is_shellcheck_clean(script):
    subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck"):
        p = subprocess.run(["shellcheck", script], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout


def test_wheels_folder_is_git_ignored():
    p = subprocess.run(["git", "check-ignore", "-q", "wheels/deepspeed-0.0.0-py3-none-any.whl"], cwd=ROOT)
    assert p.returncode == 0, "wheels/ must be git-ignored (built by benchmarks/build_gpu_wheels.sh)"
