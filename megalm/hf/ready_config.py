"""The config ``convert-from-hf`` writes beside an imported checkpoint: the imported shape on top of a
preset, the model's own tokenizer, and checkpoint.dir = the import with resume: auto, so a requeued job
resumes from its own latest step, never from the import again.
"""

from __future__ import annotations

import os
from typing import Optional

import yaml

from megalm.config import Config, apply_overrides

CONFIG_NAME = "continue.yaml"
# the preset each imported family extends (optimizer, schedule, batch, precision, ZeRO)
PRESETS = {"LlamaForCausalLM": "gpt_1b.yaml", "GPT2LMHeadModel": "gpt_125m.yaml", "BertForPreTraining": "bert_base.yaml"}


def default_preset(cls: str) -> Optional[str]:
    """The checkout's configs/<preset> for ``cls``, or None when megalm runs without its configs/ folder."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "configs", PRESETS.get(cls, ""))
    return path if os.path.isfile(path) else None


def write_ready_config(output: str, cfg: Config, overrides: list, preset: Optional[str],
                       tokenizer: Optional[str], source: str) -> str:
    """Write ``output``/continue.yaml (and copy the tokenizer next to it); return its path."""
    root = os.path.abspath(output)
    raw: dict = {}
    if preset:
        raw["extends"] = os.path.abspath(preset)
    raw["model"] = cfg.to_dict()["model"]  # every shape key: nothing of the preset's shape leaks through
    if not any(o.startswith("model.seq_length=") for o in overrides):
        # not part of the imported shape: the preset's training length, within the model's positions
        from megalm.config import load

        want = load(preset).model.seq_length if preset else cfg.model.seq_length
        raw["model"]["seq_length"] = min(want, cfg.model.max_positions)
    if cfg.objective.name != "clm":
        raw["objective"] = {"name": cfg.objective.name}
    data: dict = {}
    if tokenizer:  # the model's own tokenizer files (SentencePiece, tokenizer.json or GPT-2 BPE), copied here
        from megalm.data.tokenizer import copy_tokenizer, saved_tokenizer

        tok_dir = os.path.join(root, "tokenizer")
        os.makedirs(tok_dir, exist_ok=True)
        copy_tokenizer(tokenizer, tok_dir)
        data["tokenizer"] = saved_tokenizer(tok_dir)
    raw["data"] = data
    run_dir = os.path.dirname(root) if os.path.basename(root) == "checkpoints" else root
    raw["checkpoint"] = {"dir": root, "resume": "auto"}
    raw["run"] = {"dir": run_dir}
    raw = apply_overrides(raw, [o for o in overrides if not o.startswith("model.")])  # parallel.*, data.*, ...
    head = (f"# Written by `megalm convert-from-hf --model {source}`: continue pretraining the imported model.\n"
            f"#   megalm train --config {os.path.join(root, CONFIG_NAME)} --set data.prefix=PREFIX\n"
            "# checkpoint.resume: auto starts from the import (step_00000000) and, once the run has saved,\n"
            "# from its own latest step, so a requeued job never goes back to the imported weights.\n")
    path = os.path.join(root, CONFIG_NAME)
    with open(path, "w") as f:
        f.write(head + yaml.safe_dump(raw, sort_keys=False))
    return path
