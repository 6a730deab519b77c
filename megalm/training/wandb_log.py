"""Weights & Biases beside TensorBoard: the same scalars under the same names, from rank 0.

Optional (``pip install 'megalm[wandb]'``). ``run.wandb.mode: auto`` goes online only with an API key
and a reachable server, else writes an offline run under run.dir/wandb (``wandb sync`` uploads it
later). The W&B run id is kept in run.dir/wandb_id.txt, so a requeued job continues the same run.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from typing import Any, Optional

from megalm import environment
from megalm.errors import ConfigError

logger = logging.getLogger("megalm")
ID_FILE = "wandb_id.txt"


def _online_possible(timeout: float = 2.0) -> bool:
    if not (environment.wandb_api_key_set() or os.path.exists(os.path.expanduser("~/.netrc"))):
        return False
    host = environment.wandb_base_url().split("://")[-1].split("/")[0]
    name, _, port = host.partition(":")
    try:
        with socket.create_connection((name, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(mode: str) -> str:
    """online | offline: WANDB_MODE wins, then the config; "auto" is offline without a key or network."""
    env = environment.wandb_mode()
    if env in ("online", "offline", "disabled"):
        return env
    if mode == "auto":
        return "online" if _online_possible() else "offline"
    return mode


class WandbLogger:
    """One W&B run per megalm run.dir; ``log`` takes the same (tag, value) pairs TensorBoard gets."""

    def __init__(self, run_dir: str, project: str, name: Optional[str], mode: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("run.wandb.project is set but wandb is not installed: pip install 'megalm[wandb]' "
                              "(or pip install wandb), or set run.wandb.project=null") from None
        self.mode = resolve_mode(mode)
        id_path = os.path.join(run_dir, ID_FILE)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids: short, alphanumeric
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        self.run = wandb.init(project=project, name=name or os.path.basename(os.path.abspath(run_dir)),
                              dir=run_dir, id=run_id, resume="allow", mode=self.mode, config=config,
                              settings=wandb.Settings(console="off", silent=True))
        logger.info(f"W&B: run {run_id} ({self.mode}) in {os.path.join(run_dir, 'wandb')}"
                    + ("; upload later with `wandb sync`" if self.mode == "offline" else ""))

    def log(self, scalars: dict[str, Any], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
