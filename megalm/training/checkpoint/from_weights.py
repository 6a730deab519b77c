"""A complete megalm checkpoint from full weights and no optimizer state (an HF import, for one).

megalm/pretrain.py resumes from it at whatever layout it runs (see manager.Checkpointer.load).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

import torch

import megalm
from megalm.config import Config
from megalm.training.checkpoint import checksum
from megalm.training.checkpoint.manifest import publish
from megalm.training.checkpoint.paths import WEIGHTS_DIR, step_name
from megalm.training.checkpoint.shard_writer import ShardWriter


def write_checkpoint(root: str, cfg: Config, vocab_size: int, weights: dict[str, torch.Tensor],
                     tokenizer_path: Optional[str] = None, step: int = 0) -> str:
    """Write ``weights`` (full tensors keyed by ``build_model`` names) as ``root/step_N``; return its path."""
    from megalm.tp_shard_rules import tp_rule

    cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    name = step_name(step)
    tmp = os.path.join(root, ".tmp-" + name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, WEIGHTS_DIR))
    rel = os.path.join(WEIGHTS_DIR, "tp00-pp00.safetensors")
    # The file holds each tensor whole (one piece, tensor rank 0), but its partition must still be the one the
    # model splits it by: the loader cuts each TP rank's slice from that, and "dim": None would mean replicated
    # (every rank loads the whole tensor). Name rules, as in the HF mapping; names they do not know are replicated.
    parts = {}
    for n in weights:
        rule = tp_rule(n, cfg, vocab_size)
        parts[n] = {"dim": int(rule[0]), "partitions": [int(x) for x in rule[1]]} if rule else \
            {"dim": None, "partitions": None}
    meta = {"tensor_size": 1, "tensor_rank": 0, "pipeline_size": 1, "pipeline_rank": 0, "params": parts}
    w = ShardWriter(os.path.join(tmp, rel), [(n, torch.float32, tuple(t.shape)) for n, t in weights.items()],
                    {"megalm": json.dumps(meta)})
    for n, t in weights.items():
        w.write(n, t.float())
    size, sha = w.close()
    index = {"weights": {n: {"partition": parts[n], "pieces": {"0": rel}} for n in weights}, "optim": {}}
    state = {"step": step, "consumed_samples": 0, "world_size": 1, "tensor": 1, "pipeline": 1,
             "zero_stage": 0, "megalm_version": megalm.__version__, "config": cfg.to_dict(), "universal_only": True,
             "tensor_index": index}
    return publish(root, tmp, name, state, tokenizer_path, reports={rel: checksum.entry(size, sha)})
