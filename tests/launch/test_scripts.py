"""Every launch script parses (bash -n), is shellcheck-clean, and keeps the promises the docs make."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))
SBATCH = [p for p in SCRIPTS if os.path.basename(p).startswith("pretrain_")]


def test_the_launchers_exist():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"pretrain_gpt_1b.sh", "pretrain_bert_base.sh", "pretrain_plm_base.sh",
            "deepspeed_local.sh", "torchrun_local.sh"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_bash_parses(path):
    out = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    out = subprocess.run(["shellcheck", "-x", "--severity=style", *SCRIPTS], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", SBATCH, ids=os.path.basename)
def test_sbatch_header(path):
    with open(path) as f:
        text = f.read()
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert header["ntasks-per-node"] == "8" and header["gpus-per-node"] == "8"
    assert header["signal"] == "B:USR1@120"
    assert "requeue" in header and header["open-mode"] == "append"
    assert "%j" in header["output"]  # one output file per job, appended to across requeues
    for site in ("account", "partition"):  # site settings come from SBATCH_ACCOUNT / SBATCH_PARTITION
        assert site not in header
    config = re.search(r'MEGALM_CONFIG:=(\S+)}"', text).group(1)
    assert os.path.exists(os.path.join(REPO, config)), config
    assert os.access(path, os.X_OK)


def test_sbatch_script_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["MEGALM_ROOT"] = REPO
    out = subprocess.run(["bash", os.path.join(REPO, "launch", "pretrain_gpt_1b.sh")], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=30)
    assert out.returncode == 2 and "not inside a Slurm job" in out.stderr


def test_sbatch_script_names_a_wrong_root(tmp_path):
    env = dict(os.environ, MEGALM_ROOT=str(tmp_path), SLURM_JOB_ID="1")
    out = subprocess.run(["bash", os.path.join(REPO, "launch", "pretrain_gpt_1b.sh")], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=30)
    assert out.returncode == 2 and "not a megalm checkout" in out.stderr
