"""Which state-dict entries are split across TP ranks, and how: shard a full state dict, gather shards back.

Pure name rules (no model needed) for a Config's layout, so checkpoint converters can use them; the
tests check they agree with the attributes the live parameters carry.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import torch

from megalm.build import padded_vocab_size
from megalm.config import Config
from megalm.parallel.layers import shard, unshard


def tp_rule(name: str, cfg: Config, vocab_size: int) -> Optional[tuple]:
    """(partition dim, full partition sizes) for a split param, None for a replicated one.

    ``name`` may carry any prefix (a pipeline layer index, "module."), matched on its tail.
    """
    m = cfg.model
    d = m.hidden_size // m.num_heads
    q, kv, f = m.num_heads * d, m.kv_heads * d, m.ffn_size
    vp = padded_vocab_size(vocab_size, cfg)
    rules = [
        (r"(^|\.)word\.weight$", (0, (vp,))),
        (r"(^|\.)lm_bias$", (0, (vp,))),
        (r"(^|\.)head\.weight$", (0, (vp,))),
        (r"(^|\.)attention\.qkv\.(weight|bias)$", (0, (q, kv, kv))),
        (r"(^|\.)attention\.out\.weight$", (1, (q,))),
        (r"(^|\.)mlp\.fc1\.(weight|bias)$", (0, (f, f) if m.activation == "swiglu" else (f,))),
        (r"(^|\.)mlp\.fc2\.weight$", (1, (f,))),
    ]
    for pattern, rule in rules:
        if re.search(pattern, name):
            return rule
    return None


def shard_state_dict(full: Mapping[str, torch.Tensor], cfg: Config, vocab_size: int, tp_rank: int,
                     tp_size: int) -> dict:
    """This TP rank's state dict from a full (TP=1) one."""
    out = {}
    for name, t in full.items():
        rule = tp_rule(name, cfg, vocab_size)
        out[name] = shard(t, rule[0], rule[1], tp_rank, tp_size) if rule else t
    return out


def gather_state_dicts(shards: Sequence[Mapping[str, torch.Tensor]], cfg: Config, vocab_size: int) -> dict:
    """The full (TP=1) state dict from every TP rank's state dict, in rank order."""
    out = {}
    for name, t in shards[0].items():
        rule = tp_rule(name, cfg, vocab_size)
        out[name] = unshard([s[name] for s in shards], rule[0], rule[1]) if rule else t
    return out
