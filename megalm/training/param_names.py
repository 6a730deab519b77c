"""This rank's parameters under their ``build_model`` names: the keys of every layout-free checkpoint.

Pipeline stages name their layers by index (``3.attn.qkv.weight``); checkpoints and
exports use the plain model's names, so any layout can read any other's files.
"""

from __future__ import annotations

from typing import Any

import torch

from megalm.config import Config


def model_param_names(engine: Any, cfg: Config, replicated: bool = False) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters under their ``build_model`` names (pipeline layer indices mapped back).

    Tied copies on a non-owner pipeline stage are left out unless ``replicated``.
    """
    module = engine.ds.module
    if not engine.pipeline:
        return dict(module.named_parameters())
    from deepspeed.pipe import TiedLayerSpec

    from megalm.model.pipeline import pipeline_name_prefixes
    from megalm.training.ds_state import is_pipe_replicated, pipeline_layer_specs

    prefixes = pipeline_name_prefixes(cfg)
    tie_first = {}
    for i, spec in enumerate(pipeline_layer_specs(module)):
        if isinstance(spec, TiedLayerSpec) and spec.key not in tie_first:
            tie_first[spec.key] = i
    out = {}
    for name, p in module.named_parameters():
        head, rest = name.split(".", 1)
        if head == "tied_modules":
            key, rest = rest.split(".", 1)
            if is_pipe_replicated(p) and not replicated:
                continue  # the owner stage writes it
            out[prefixes[tie_first[key]] + rest] = p
        else:
            prefix = prefixes[int(head)]
            if prefix is not None:
                out[prefix + rest] = p
    return out
