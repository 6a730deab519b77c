"""``megalm convert-from-hf``: a local Llama / GPT-2 / BERT directory -> a megalm checkpoint to continue pretraining.

The model shape comes from config.json (megalm.hf.mapping.model_config_from_hf);
a megalm export's own megalm_export.json, when present, restores the rest of its
training config. Weights are written layout-free (universal.write_checkpoint), so
``--set parallel.tensor=... parallel.pipeline=...`` picks the layout pretraining resumes at.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
from typing import Optional


from megalm.config import apply_overrides, from_dict
from megalm.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# model_type (config.json) -> the mapping's class
_BY_TYPE = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForPreTraining"}
_PREFIX = {"GPT2LMHeadModel": "transformer.", "BertForPreTraining": "bert."}


def read_hf_config(model_dir: str) -> dict:
    from megalm.jsonfile import read_json

    return read_json(os.path.join(model_dir, "config.json"), CheckpointError,
                     "--model must be a local Hugging Face model directory")


def read_hf_weights(model_dir: str) -> dict:
    """Every tensor of ``model.safetensors`` (or its shards), as fp32."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        bins = glob.glob(os.path.join(model_dir, "*.bin"))
        hint = " (only pickled .bin weights found: re-save them with save_pretrained(safe_serialization=True))" \
            if bins else ""
        raise CheckpointError(f"{model_dir} holds no .safetensors weights{hint}")
    out: dict = {}
    for path in files:
        for name, t in load_file(path).items():
            out[name] = t.float() if t.is_floating_point() else t
    return out


def _normalise_names(state: dict, cls: str) -> dict:
    """Base-model checkpoints (GPT2Model, BertModel, hub gpt2) lack the task-model prefix: add it."""
    prefix = _PREFIX.get(cls)
    if not prefix or any(k.startswith(prefix) for k in state):
        return state
    return {(k if k.startswith(("lm_head.", "cls.")) else prefix + k): v for k, v in state.items()}


def hf_class_of(hf: dict, model_dir: str) -> str:
    cls = _BY_TYPE.get(hf.get("model_type", ""))
    if cls is None:
        raise ConfigError(f"{model_dir}/config.json has model_type={hf.get('model_type')!r}; megalm imports "
                          f"{', '.join(sorted(_BY_TYPE))}")
    return cls


# the activation megalm computes for each class, and config.json's key for it
_ACTIVATION = {"LlamaForCausalLM": ("hidden_act", "silu"), "GPT2LMHeadModel": ("activation_function", "gelu"),
               "BertForPreTraining": ("hidden_act", "gelu")}


def check_activation(hf: dict, cls: str, model_dir: str, approximate: bool) -> None:
    """megalm has exact GELU and SiLU only: refuse e.g. GPT-2's tanh "gelu_new" unless told to approximate."""
    key, want = _ACTIVATION[cls]
    have = hf.get(key, "gelu_new" if cls == "GPT2LMHeadModel" else want)
    if have == want:
        return
    if not approximate:
        raise ConfigError(f"{model_dir}/config.json has {key}={have!r}; megalm computes {want!r}, so the imported "
                          f"model would differ (pass --approximate-activation to continue pretraining with {want!r})")
    log.warning("%s: %s=%r replaced by megalm's %r (logits will differ slightly)", model_dir, key, have, want)


def import_hf(model_dir: str, output: str, overrides: Optional[list] = None, step: int = 0,
              approximate_activation: bool = False, preset: Optional[str] = "default") -> str:
    """Write a megalm checkpoint under ``output`` from ``model_dir``, and ``output``/continue.yaml to train
    it on (extending ``preset``: "default" picks the family's, None none); returns the step directory."""
    from megalm.hf import mapping
    from megalm.training.checkpoint.from_weights import write_checkpoint

    hf = read_hf_config(model_dir)
    cls = hf_class_of(hf, model_dir)
    check_activation(hf, cls, model_dir, approximate_activation)
    raw: dict = {}
    info_path = os.path.join(model_dir, "megalm_export.json")
    if os.path.isfile(info_path):  # our own export: keep its training config (objective, init, seed, ...)
        with open(info_path) as f:
            raw = json.load(f)["megalm_config"]
        raw.pop("parallel", None)
    raw.setdefault("model", {})
    raw["model"].update(mapping.model_config_from_hf(cls, hf))
    raw["model"]["vocab_size"] = hf["vocab_size"]
    positions = raw["model"].get("max_position_embeddings")
    if positions and "seq_length" not in raw["model"]:  # never longer than the model's positions
        from megalm.config import ModelConfig

        raw["model"]["seq_length"] = min(ModelConfig.seq_length, int(positions))
    if cls == mapping.BERT:
        raw.setdefault("objective", {})["name"] = "mlm"
    tok = _model_tokenizer(model_dir, ours=os.path.isfile(info_path))
    raw.setdefault("data", {})
    if tok:
        raw["data"]["tokenizer"] = os.path.abspath(tok)
    cfg = from_dict(apply_overrides(raw, list(overrides or [])), f" (from {model_dir} and --set)")
    vocab = int(hf["vocab_size"])
    state = _normalise_names(read_hf_weights(model_dir), cls)
    if cls == mapping.BERT:
        state = _fill_binary_head(state, cfg, vocab)
    weights = mapping.from_hf(state, cfg, vocab, cls)
    root = os.path.abspath(output)
    _refuse_existing_run(root)
    os.makedirs(root, exist_ok=True)
    step_dir = write_checkpoint(root, cfg, vocab, weights, tokenizer_path=tok, step=step)
    from megalm.hf.ready_config import default_preset, write_ready_config

    ready = write_ready_config(root, cfg, list(overrides or []), default_preset(cls) if preset == "default" else preset,
                               tok, model_dir)
    log.info("wrote %s: `megalm train --config %s --set data.prefix=...` continues from the import", ready, ready)
    if tok is None:
        log.warning("%s has no tokenizer.json or tokenizer.model: set data.tokenizer when pretraining", model_dir)
    log.info("imported %s (%s) into %s at tensor=%d pipeline=%d", model_dir, cls, step_dir,
             cfg.parallel.tensor, cfg.parallel.pipeline)
    return step_dir


def _model_tokenizer(model_dir: str, ours: bool) -> Optional[str]:
    """The model's own tokenizer: tokenizer.json (what AutoTokenizer reads) for a foreign model, the SentencePiece
    tokenizer.model megalm trained with for one of megalm's exports (its tokenizer.json is derived from it)."""
    order = ("tokenizer.model", "tokenizer.json") if ours else ("tokenizer.json", "tokenizer.model")
    for name in order:
        p = os.path.join(model_dir, name)
        if os.path.isfile(p):
            return os.path.abspath(p)
    return None


def _refuse_existing_run(root: str) -> None:
    """An import must never repoint ``latest`` of a run that is training into ``root``."""
    from megalm.training.checkpoint.paths import list_steps

    if os.path.exists(os.path.join(root, "latest")) or list_steps(root):
        raise CheckpointError(f"{root} already holds checkpoints (a run's 'latest' or step_* directories); "
                              f"importing into it would replace what a resume picks up. Give a new --output "
                              f"directory")


def _fill_binary_head(state: dict, cfg, vocab: int) -> dict:
    """A BertForMaskedLM / BertModel export has no pooler or NSP head: start them from megalm's init."""
    need = ("bert.pooler.dense.weight", "cls.seq_relationship.weight")
    if all(k in state for k in need) or cfg.objective.binary_head == "none":
        return state
    from megalm.hf import mapping
    from megalm.build import build_model

    ref = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tensor=1, pipeline=1))
    fresh, _, _ = mapping.to_hf(build_model(ref, vocab).state_dict(), ref, vocab, mapping.BERT)
    added = [k for k in fresh if k.startswith(("bert.pooler.", "cls.seq_relationship.")) and k not in state]
    log.warning("no pooler / binary head in the Hugging Face weights: initialised %s afresh", ", ".join(added))
    return {**state, **{k: fresh[k] for k in added}}


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm convert-from-hf", description=__doc__)
    p.add_argument("--model", required=True, help="local Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--output", required=True, help="checkpoint root to write (step_00000000 + latest)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. parallel.tensor=2 parallel.pipeline=2 model.seq_length=1024")
    p.add_argument("--step", type=int, default=0, help="step number to record (default 0)")
    p.add_argument("--preset", default="default",
                   help="config the written continue.yaml extends for optimizer/schedule/batch "
                        "[configs/gpt_1b.yaml for Llama, gpt_125m.yaml for GPT-2, bert_base.yaml for BERT]")
    p.add_argument("--approximate-activation", action="store_true",
                   help="import even if the HF activation (e.g. GPT-2's gelu_new) is not exactly megalm's")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    step_dir = import_hf(args.model, args.output, args.set, args.step, args.approximate_activation, args.preset)
    print(f"wrote {step_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
