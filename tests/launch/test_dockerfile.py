"""The Dockerfile's pinned install list agrees with setup.cfg, runs as non-root and bakes in no secrets.

No Docker engine runs on our machines, so this reads the files; building the image is left to a GPU cluster.
"""

from __future__ import annotations

import configparser
import os
import re

from packaging.requirements import Requirement
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dockerfile() -> str:
    with open(os.path.join(REPO, "Dockerfile")) as f:
        return f.read()


def _pins(text: str) -> dict[str, Version]:
    return {m.group(1).lower(): Version(m.group(2)) for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text)}


def _setup_requirements() -> tuple[list[Requirement], list[Requirement]]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    lines = lambda s: [Requirement(x.strip()) for x in s.splitlines() if x.strip() and not x.strip().startswith("#")]  # noqa: E731
    return lines(cfg["options"]["install_requires"]), lines(cfg["options.extras_require"]["hf"])


def _base_torch(text: str) -> Version:
    m = re.search(r"ARG BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-devel", text)
    assert m, "the base image must be an official pytorch/pytorch CUDA *devel* tag (DeepSpeed JIT-builds ops)"
    return Version(m.group(1))


def test_every_dependency_is_pinned_within_setup_cfg():
    text = _dockerfile()
    pins = _pins(text)
    required, hf = _setup_requirements()
    for req in required + hf:
        name = req.name.lower()
        version = _base_torch(text) if name == "torch" else pins.get(name)
        assert version is not None, f"{req.name} from setup.cfg is not pinned in the Dockerfile"
        assert req.specifier.contains(version, prereleases=True), f"Dockerfile pins {name}=={version}; setup.cfg wants {req}"
    # and nothing pinned that megalm does not ask for
    names = {r.name.lower() for r in required + hf}
    assert set(pins) <= names, set(pins) - names
    assert "torch" not in pins  # the base image's CUDA build; re-installing would pull another


def test_runs_as_a_non_root_user_and_installs_without_deps():
    text = _dockerfile()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), users
    assert re.search(r"pip install --no-deps", text)


def test_no_secrets_baked_in():
    text = _dockerfile()
    for line in text.splitlines():
        if re.match(r"\s*(ENV|ARG)\b", line) or re.match(r"^\s+\w+=", line):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|HF_HUB_TOKEN)", line, re.I), line
    assert not re.search(r"^(COPY|ADD)\s+.*(\.netrc|\.ssh|id_rsa|\.aws|credentials)", text, re.M)
    with open(os.path.join(REPO, ".dockerignore")) as f:
        ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert {".git", ".env", ".netrc", "runs", "data", "checkpoints"} <= ignored
