"""Layout-independent weights and optimizer state inside every checkpoint, and resharding through them.

Each (tensor rank, pipeline stage) of data-parallel replica 0 writes
``megalm/weights/tpTT-ppPP.safetensors`` (fp32 master values of its TP shards,
keyed by ``build_model`` parameter names, with each shard's partition dim in the
metadata) and ``megalm/optim/tpTT-ppPP.safetensors`` (Adam moments). Reading
them back gives full tensors, from which any other TP x PP x DP x ZeRO layout —
or an HF export — takes what it needs. Only safetensors and JSON are read: no pickle.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Optional

import torch

from megalm.config import Config, from_dict
from megalm.errors import CheckpointError

logger = logging.getLogger(__name__)

WEIGHTS_DIR = os.path.join("megalm", "weights")
OPTIM_DIR = os.path.join("megalm", "optim")
STATE_FILE = os.path.join("megalm", "megalm_state.json")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------ names

def model_param_names(engine: Any, cfg: Config, replicated: bool = False) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters under their ``build_model`` names (pipeline layer indices mapped back).

    Tied copies on a non-owner pipeline stage are left out unless ``replicated``.
    """
    module = engine.ds.module
    if not engine.pipeline:
        return dict(module.named_parameters())
    from deepspeed.pipe import TiedLayerSpec

    from megalm.model.pipeline import pipeline_name_prefixes

    prefixes = pipeline_name_prefixes(cfg)
    tie_first = {}
    for i, spec in enumerate(module._layer_specs):
        if isinstance(spec, TiedLayerSpec) and spec.key not in tie_first:
            tie_first[spec.key] = i
    out = {}
    for name, p in module.named_parameters():
        head, rest = name.split(".", 1)
        if head == "tied_modules":
            key, rest = rest.split(".", 1)
            if getattr(p, "ds_pipe_replicated", False) and not replicated:
                continue  # the owner stage writes it
            out[prefixes[tie_first[key]] + rest] = p
        else:
            prefix = prefixes[int(head)]
            if prefix is not None:
                out[prefix + rest] = p
    return out


def _partition(p: torch.nn.Parameter) -> dict:
    if getattr(p, "tensor_model_parallel", False):
        return {"dim": int(p.partition_dim), "partitions": [int(x) for x in p.partitions]}
    return {"dim": None, "partitions": None}


# ------------------------------------------------------------------ save

def _fp32_value(p: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p)
    return (p.detach() if value is None else value).float().cpu().contiguous()


def _adam_state(engine: Any, p: torch.nn.Parameter) -> Optional[dict]:
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        out = {k: safe_get_full_optimizer_state(p, k) for k in ADAM_KEYS}
        return None if any(v is None for v in out.values()) else {k: v.float().cpu() for k, v in out.items()}
    opt = engine.ds.optimizer
    state = getattr(opt, "state", {}).get(p)
    if not state or "exp_avg" not in state:
        return None
    return {k: state[k].detach().float().cpu() for k in ADAM_KEYS}


def _adam_step(engine: Any) -> int:
    """Adam's own step count (skipped fp16 steps excluded), from any param's state."""
    opt = engine.ds.optimizer
    inner = getattr(opt, "optimizer", opt)
    for st in getattr(inner, "state", {}).values():
        if "step" in st:
            return int(torch.as_tensor(st["step"]).item())
    return 0


def _relink_optimizer_fragments(engine: Any) -> None:
    """ZeRO-1/2 and bf16 link each parameter to its slice of the Adam state once, lazily; when that ran
    before the state existed, safe_get_full_optimizer_state finds no 'exp_avg'. Link again now."""
    opt = engine.ds.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and getattr(opt, "optimizer", None) is not None:
        if getattr(opt.optimizer, "state", None):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()


def save_shards(engine: Any, cfg: Config, step_dir: str) -> None:
    """Every rank calls this (ZeRO gathers are collective); DP rank 0 of each (TP, PP) writes."""
    from safetensors.torch import save_file

    from megalm.parallel import state

    params = model_param_names(engine, cfg)
    _relink_optimizer_fragments(engine)
    ctx = _gathered(engine, list(params.values()))
    with ctx:
        weights = {n: _fp32_value(p) for n, p in params.items()}
        moments = {n: _adam_state(engine, p) for n, p in params.items()}
    if engine.dp_rank != 0:
        return
    tag = f"tp{state.tensor_rank():02d}-pp{state.pipeline_rank():02d}"
    meta = {
        "tensor_size": state.tensor_size(), "tensor_rank": state.tensor_rank(),
        "pipeline_size": state.pipeline_size(), "pipeline_rank": state.pipeline_rank(),
        "params": {n: _partition(p) for n, p in params.items()},
    }
    os.makedirs(os.path.join(step_dir, WEIGHTS_DIR), exist_ok=True)
    save_file(weights, os.path.join(step_dir, WEIGHTS_DIR, tag + ".safetensors"), metadata={"megalm": json.dumps(meta)})
    if all(m is not None for m in moments.values()) and moments:
        os.makedirs(os.path.join(step_dir, OPTIM_DIR), exist_ok=True)
        flat = {f"{n}/{k}": v.contiguous() for n, m in moments.items() for k, v in m.items()}
        meta["adam_step"] = _adam_step(engine)
        save_file(flat, os.path.join(step_dir, OPTIM_DIR, tag + ".safetensors"), metadata={"megalm": json.dumps(meta)})


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _gathered(engine: Any, params: list) -> Any:
    if params and hasattr(params[0], "ds_id"):  # ZeRO-3: gather full params for the duration
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return _NullCtx()


# ------------------------------------------------------------------ read

def resolve_step_dir(path: str, step: Optional[int] = None) -> str:
    """A checkpoint root (following ``latest``, or ``step``) or a step directory -> the step directory."""
    from megalm.training.checkpoint import latest_path, step_name

    if os.path.exists(os.path.join(path, STATE_FILE)):
        return path
    if step is not None:
        candidate = os.path.join(path, step_name(step))
        if not os.path.isdir(candidate):
            raise CheckpointError(f"{path} has no checkpoint for step {step}")
        return candidate
    latest = latest_path(path) if os.path.isdir(path) else None
    if latest is None:
        raise CheckpointError(f"{path} is neither a megalm checkpoint step directory nor a root with a 'latest' file")
    return latest


def read_state(step_dir: str) -> dict:
    from megalm.jsonfile import read_json

    return read_json(os.path.join(step_dir, STATE_FILE), CheckpointError, "not a megalm checkpoint")


def _read_sharded(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Full tensors from every tpTT-ppPP file in ``folder``; also the first file's metadata."""
    from safetensors import safe_open

    from megalm.parallel.layers import unshard

    files = sorted(glob.glob(os.path.join(folder, "tp*-pp*.safetensors")))
    if not files:
        raise CheckpointError(f"{folder} holds no tpTT-ppPP.safetensors files")
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    parts: dict[str, dict] = {}
    first_meta: dict = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["megalm"])
            first_meta = first_meta or meta
            for key in f.keys():
                name = key.split("/", 1)[0]
                pieces.setdefault(key, {})[meta["tensor_rank"]] = f.get_tensor(key)
                parts[key] = meta["params"][name]
    full = {}
    for key, by_rank in pieces.items():
        part = parts[key]
        shards = [by_rank[r] for r in sorted(by_rank)]
        if part["dim"] is None:
            full[key] = shards[0]
        else:
            expected = first_meta["tensor_size"]
            if len(shards) != expected:
                raise CheckpointError(f"{folder}: {key} has {len(shards)} of {expected} tensor-parallel shards")
            full[key] = unshard(shards, part["dim"], part["partitions"])
    return full, first_meta


def read_full_weights(path: str, step: Optional[int] = None) -> tuple[Config, int, dict[str, torch.Tensor]]:
    """(config, true vocab size, full fp32 weights keyed by build_model names) of a checkpoint."""
    step_dir = resolve_step_dir(path, step)
    state = read_state(step_dir)
    cfg = from_dict(state["config"], f" (in {step_dir})")
    weights, _ = _read_sharded(os.path.join(step_dir, WEIGHTS_DIR))
    return cfg, int(cfg.model.vocab_size), weights


def read_full_optimizer(step_dir: str) -> Optional[tuple[dict[str, dict[str, torch.Tensor]], int]]:
    folder = os.path.join(step_dir, OPTIM_DIR)
    if not os.path.isdir(folder):
        return None
    flat, meta = _read_sharded(folder)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, k = key.split("/", 1)
        out.setdefault(name, {})[k] = value
    return out, int(meta.get("adam_step", 0))


# ------------------------------------------------------------------ load into a (different) layout

def _shard_for_me(full: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    from megalm.parallel import state
    from megalm.parallel.layers import shard

    if getattr(p, "tensor_model_parallel", False):
        return shard(full, p.partition_dim, p.partitions, state.tensor_rank(), state.tensor_size())
    return full


def load_into_engine(engine: Any, cfg: Config, step_dir: str, with_optimizer: bool = True) -> bool:
    """Set this rank's parameters (and Adam moments when saved) from a checkpoint of any layout.

    Returns True when the optimizer state was carried over too.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _, _, weights = read_full_weights(step_dir)
    optim = read_full_optimizer(step_dir) if with_optimizer else None
    params = model_param_names(engine, cfg, replicated=True)
    missing = [n for n in params if n not in weights]
    if missing:
        raise CheckpointError(f"{step_dir} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    carried = optim is not None
    opt = engine.ds.optimizer
    with torch.no_grad():
        for name, p in params.items():
            value = _shard_for_me(weights[name], p)
            if value.shape != p.shape and not hasattr(p, "ds_id"):
                raise CheckpointError(f"{step_dir}: {name} has shape {tuple(value.shape)}, the model {tuple(p.shape)}")
            if hasattr(p, "ds_id"):  # ZeRO-3: set the fp32 partition; the module copy is gathered from it
                safe_set_full_fp32_param(p, value.to(p.device))
                continue
            p.data.copy_(value.to(p.dtype))
            if hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16: the fp32 master copy too
                safe_set_full_fp32_param(p, value.to(p.device))
    if carried:
        moments, adam_step = optim
        for name, p in params.items():
            m = {k: _shard_for_me(v, p) for k, v in moments[name].items()}
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                try:
                    for k, v in m.items():
                        safe_set_full_optimizer_state(p, v.to(p.device), k)
                except (KeyError, AttributeError, RuntimeError):
                    carried = False
            elif hasattr(opt, "state"):
                opt.state[p] = {"step": torch.tensor(float(adam_step)), **{k: v.to(p.device) for k, v in m.items()}}
            else:
                carried = False
    return carried


def write_checkpoint(root: str, cfg: Config, vocab_size: int, weights: dict[str, torch.Tensor],
                     tokenizer_path: Optional[str] = None, step: int = 0) -> str:
    """A complete megalm checkpoint from full weights (no DeepSpeed files, no optimizer state).

    megalm/pretrain.py resumes from it at whatever layout it runs (see Checkpointer.load).
    """
    import dataclasses
    import shutil

    from safetensors.torch import save_file

    import megalm
    from megalm.training.checkpoint import publish, step_name

    cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    name = step_name(step)
    tmp = os.path.join(root, ".tmp-" + name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, WEIGHTS_DIR))
    meta = {"tensor_size": 1, "tensor_rank": 0, "pipeline_size": 1, "pipeline_rank": 0,
            "params": {n: {"dim": None, "partitions": None} for n in weights}}
    save_file({n: t.float().contiguous() for n, t in weights.items()},
              os.path.join(tmp, WEIGHTS_DIR, "tp00-pp00.safetensors"), metadata={"megalm": json.dumps(meta)})
    state = {"step": step, "consumed_samples": 0, "world_size": 1, "tensor": 1, "pipeline": 1,
             "zero_stage": 0, "megalm_version": megalm.__version__, "config": cfg.to_dict(), "universal_only": True}
    return publish(root, tmp, name, state, tokenizer_path)
