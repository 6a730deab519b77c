"""Typed run configuration: YAML files (with ``extends:``) + ``--set a.b=c``.

Every stage of the data path reads its settings from one frozen ``Config``;
this module also derives the DeepSpeed JSON from it and checks a user's
``--ds-config`` against it.

A choice is a ``Literal[...]`` type (the loader checks it, the reference lists it), and a key's
meaning is its field's ``metadata["help"]`` (written by ``_doc``): ``megalm config reference``
generates the README table from the types and metadata alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from megalm.errors import ConfigError

# The choice types: a new choice is one more name in one of these (the loader and the reference follow).
Arch = Literal["gpt", "bert"]
Position = Literal["learned", "sinusoidal", "rope", "alibi"]
Norm = Literal["layernorm", "rmsnorm"]
NormPosition = Literal["pre", "post"]
Activation = Literal["gelu", "swiglu"]
TwoStreamAttention = Literal["auto", "order", "masks"]
BinaryHead = Literal["sop", "nsp", "none"]
PipelinePartition = Literal["uniform", "parameters"]
ZeroStage = Literal[0, 1, 2, 3]
Precision = Literal["fp32", "bf16", "fp16"]
Recompute = Literal["none", "full", "selective"]
CompileMode = Literal["auto", "none", "fused", "blocks"]
OptimizerName = Literal["adamw"]
Schedule = Literal["constant", "linear", "cosine", "inverse_sqrt", "wsd"]
Verify = Literal["full", "size", "none"]
WandbMode = Literal["auto", "online", "offline"]
LogLevel = Literal["debug", "info", "warning", "error"]


def _doc(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its README meaning in ``metadata["help"]``."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    """The Transformer's shape. ``arch`` picks the family: ``gpt`` (decoder) or ``bert`` (encoder)."""

    arch: Arch = _doc("gpt", "decoder (gpt) or encoder (bert)")
    num_layers: int = _doc(2, "Transformer blocks")
    hidden_size: int = _doc(128, "width of the residual stream")
    num_heads: int = _doc(4, "attention (query) heads")
    num_kv_heads: Optional[int] = _doc(None, "grouped-query attention; None = num_heads")
    ffn_hidden_size: Optional[int] = _doc(None, "None = 4*hidden (gelu) or 8/3*hidden rounded to 64 (swiglu)")
    seq_length: int = _doc(128, "tokens per training sample")
    max_position_embeddings: Optional[int] = _doc(None, "None = seq_length")
    vocab_size: Optional[int] = _doc(None, "None = the tokenizer's")
    make_vocab_size_divisible_by: int = _doc(128, "the embedding is padded to a multiple of this x parallel.tensor")
    position: Position = _doc("rope", "position encoding")
    rope_base: float = _doc(10000.0, "RoPE frequency base (theta)")
    rope_scaling: Optional[dict] = _doc(None, "Llama-3 long context: {type: llama3, factor, low_freq_factor, "
                                        "high_freq_factor, original_max_position_embeddings}")
    norm: Norm = _doc("rmsnorm", "normalisation layer")
    norm_eps: float = _doc(1e-5, "epsilon of every norm")
    norm_position: NormPosition = _doc("pre", "pre-norm blocks, or post (original BERT)")
    activation: Activation = _doc("swiglu", "MLP activation")
    bias: bool = _doc(False, "biases in the linear layers")
    tie_embeddings: bool = _doc(True, "the output head shares the input embedding's weight")
    hidden_dropout: float = _doc(0.0, "dropout after attention and MLP")
    attention_dropout: float = _doc(0.0, "dropout of the attention probabilities")
    two_stream_attention: TwoStreamAttention = _doc(
        "auto", "PLM: both streams by factorisation order (no [s, s] masks), as dense masks, or auto: the faster "
        "measured per device and seq_length (docs/model.md)")
    init_std: float = _doc(0.02, "standard deviation of the normal weight init")
    num_token_types: int = _doc(0, "BERT: 2 (segment A/B)")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return 64 * ((8 * self.hidden_size // 3 + 63) // 64)
        return 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which pretraining objective, and its options (each used by the objective that names it)."""

    name: str = _doc("clm", "clm | mlm | plm | package.module:Class")
    reset_position_ids: bool = _doc(False, "clm: positions restart after each EOD")
    reset_attention_mask: bool = _doc(False, "clm: no attention across documents")
    eod_mask_loss: bool = _doc(False, "clm: no loss where the input is EOD")
    mask_prob: float = _doc(0.15, "mlm: share of the non-special tokens chosen for prediction")
    whole_word: bool = _doc(False, "mlm: choose whole words")
    span_masking: bool = _doc(False, "mlm: choose spans of 1..max_span_length units")
    max_span_length: int = _doc(3, "mlm / plm: longest span")
    binary_head: BinaryHead = _doc("sop", "mlm: sentence order, next sentence, or no binary head")
    plm_k: int = _doc(6, "plm: predict only the last 1/K of each factorisation order")
    plm_span_order: bool = _doc(False, "plm: permute spans of 1..max_span_length tokens")
    options: dict = _doc(help="a user objective's own options", factory=dict)


@dataclass(frozen=True)
class ParallelConfig:
    tensor: int = _doc(1, "tensor-parallel degree")
    pipeline: int = _doc(1, "pipeline stages")
    sequence_parallel: bool = _doc(False, "split norms and dropout over the tensor ranks along the sequence")
    pipeline_partition: PipelinePartition = _doc("uniform", "blocks per stage: equal (uniform) or balanced by parameter count")


@dataclass(frozen=True)
class ZeroConfig:
    stage: ZeroStage = _doc(0, "DeepSpeed ZeRO stage (2 and 3 need parallel.pipeline=1)")
    offload_optimizer: bool = _doc(False, "optimizer state in CPU memory (stage >= 1)")
    offload_params: bool = _doc(False, "parameters in CPU memory (stage 3)")
    overlap_comm: bool = _doc(False, "overlap gradient reduction with the backward pass")
    contiguous_gradients: bool = _doc(True, "copy gradients into one buffer as they are produced")
    reduce_bucket_size: int = _doc(50_000_000, "elements per gradient reduction bucket")


@dataclass(frozen=True)
class LossScaleConfig:
    """fp16 dynamic loss scaling (DeepSpeed's ``fp16`` section)."""

    initial_scale_power: int = _doc(16, "fp16: the first loss scale is 2**this")
    loss_scale_window: int = _doc(1000, "fp16: clean steps before the scale grows")
    hysteresis: int = _doc(2, "fp16: overflows tolerated before the scale shrinks")
    min_loss_scale: float = _doc(1.0, "fp16: the scale never goes below this")


@dataclass(frozen=True)
class DataConfig:
    prefix: Union[str, list, None] = _doc(None, "one prefix, or [w1, prefix1, w2, prefix2, ...]")
    tokenizer: Optional[str] = _doc(None, "SentencePiece .model, tokenizer.json (or its dir), or GPT-2 vocab.json")
    split: str = _doc("969,30,1", "train,valid,test proportions of data.prefix")
    train: Union[str, list, None] = _doc(None, "instead of prefix+split: this prefix/blend, whole, for training")
    valid: Union[str, list, None] = _doc(None, "... for evaluation every train.eval_interval")
    test: Union[str, list, None] = _doc(None, "... evaluated once at the end")
    cache_dir: Optional[str] = _doc(None, "None = <prefix dir>/cache")
    num_workers: int = _doc(0, "DataLoader worker processes")


@dataclass(frozen=True)
class TrainConfig:
    iters: int = _doc(100, "optimizer steps")
    micro_batch_size: int = _doc(4, "samples per rank per forward/backward")
    global_batch_size: int = _doc(8, "samples per optimizer step, over all data-parallel ranks")
    seed: int = _doc(1234, "seeds init, data order and masking")
    log_interval: int = _doc(10, "steps between log lines")
    eval_interval: int = _doc(100, "steps between evaluations")
    eval_iters: int = _doc(10, "batches per evaluation; 0 = no evaluation")
    activation_checkpointing: Recompute = _doc("none", "recompute activations in the backward pass")
    compile: CompileMode = _doc("auto", "torch.compile of the model (auto: the device's fastest)")
    exit_duration_minutes: Optional[float] = _doc(None, "save and exit (code 75) after this long")
    exit_interval: int = _doc(0, "save and exit (code 0) at steps divisible by this; 0 = off "
                              "(Megatron's --exit-interval)")
    max_skipped_steps: int = _doc(10, "consecutive non-finite steps before the run stops (code 3)")
    peak_tflops: Optional[float] = _doc(None, "per device, for MFU; None = guess from device")


@dataclass(frozen=True)
class OptimConfig:
    name: OptimizerName = _doc("adamw", "optimizer")
    lr: float = _doc(3e-4, "peak learning rate")
    min_lr: float = _doc(3e-5, "learning rate at the end of the decay")
    weight_decay: float = _doc(0.1, "decoupled weight decay")
    beta1: float = _doc(0.9, "Adam beta1")
    beta2: float = _doc(0.95, "Adam beta2")
    eps: float = _doc(1e-8, "Adam epsilon")
    clip_grad: float = _doc(1.0, "global gradient-norm clip; 0 = no clipping")
    schedule: Schedule = _doc("cosine", "learning-rate decay after the warmup")
    warmup_iters: int = _doc(0, "linear warmup steps")
    decay_iters: Optional[int] = _doc(None, "None = train.iters")
    wsd_decay_fraction: float = _doc(0.1, "wsd: the last fraction of the decay steps, decaying to min_lr (constant before)")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: Optional[str] = _doc(None, "None = run.dir/checkpoints")
    interval: int = _doc(0, "0 = no periodic saves (one is still written at the end)")
    keep: int = _doc(2, "newest checkpoints kept")
    keep_every: int = _doc(0, "also keep every Nth step forever; 0 = off")
    resume: str = _doc("auto", "auto | none | <path to a checkpoint step dir>")
    save_at_end: bool = _doc(True, "save when the run ends")
    verify: Verify = _doc("full", "on load, each rank checks the files it reads: full (size + checksum), size, none")
    async_save: bool = _doc(False, "the step loop waits only for the copy to host memory; write + publish in "
                            "background")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging (the optional ``wandb`` extra): off unless a project is named."""

    project: Optional[str] = _doc(None, "W&B project; None = no W&B")
    name: Optional[str] = _doc(None, "run name; None = the run.dir's name")
    mode: WandbMode = _doc("auto", "auto: online with an API key and a reachable server, else offline")


@dataclass(frozen=True)
class RunConfig:
    dir: str = _doc("runs/default", "the run's directory: config, metrics, logs, checkpoints")
    tensorboard: bool = _doc(True, "write TensorBoard events under run.dir/tensorboard")
    log_level: LogLevel = _doc("info", "rank 0's log level")
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: Precision = _doc("fp32", "fp16 needs CUDA")
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run.dir, "checkpoints")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor * self.parallel.pipeline)

    def grad_accum_steps(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)



# ---------------------------------------------------------------- building

def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a right name in the wrong section: compare the last part only
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check ``value`` against a field's type, allowing only lossless conversions."""
    origin = typing.get_origin(hint)
    if origin is Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass  # try the next type
        names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"config key '{key}'{where} must be {names}, got {value!r}")
    if origin is Literal:
        return _check_choice(value, typing.get_args(hint), key, where)
    expected = origin or hint
    ok = False
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is str:
        ok = isinstance(value, str)
    elif expected is list:
        ok = isinstance(value, list)
    elif expected is dict:
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(
            f"config key '{key}'{where} must be {getattr(expected, '__name__', expected)}, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def _check_choice(value: Any, allowed: tuple, key: str, where: str) -> Any:
    """A ``Literal`` field: the value must be one of ``allowed``, with its type (``True`` is not stage 1)."""
    if any(value == a and type(value) is type(a) for a in allowed):
        return value
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"config key '{key}'{where} must be one of {', '.join(map(str, allowed))}; "
                      f"got {value!r}{hint}")


def _build(cls: type, raw: dict, prefix: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}'{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown_key_error(key, _all_keys(), where)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key + ".", where)
        else:
            kwargs[name] = _coerce(value, hint, key, where)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config {path}: 'extends' forms a cycle through {', '.join(seen)}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a YAML mapping at the top level")
    parents = raw.pop("extends", None) or raw.pop("defaults", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict = {}
    for parent in parents:
        parent_path = os.path.join(os.path.dirname(path), parent)
        merged = _deep_merge(merged, _read_yaml(parent_path, seen + (path,)))
    return _deep_merge(merged, raw)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (['a', 'b'], typed c). Values are YAML: 3, 0.1, true, [1, 2], null."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = dict(raw)
    for item in overrides or []:
        parts, value = parse_override(item)
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    # rebuild nested copies so callers can't mutate the source
    return json.loads(json.dumps(raw))


def from_dict(raw: dict, where: str = "") -> Config:
    cfg = _build(Config, raw, "", where)
    cfg = _normalise(cfg)
    validate(cfg)
    return cfg


def _normalise(cfg: Config) -> Config:
    """Fill derived defaults that depend on other sections."""
    model = cfg.model
    if model.arch == "bert" and model.num_token_types == 0:
        model = dataclasses.replace(model, num_token_types=2)
    return dataclasses.replace(cfg, model=model)


def load_raw(path: Optional[str], overrides: Optional[list[str]] = None) -> dict:
    raw = _read_yaml(path) if path else {}
    return apply_overrides(raw, overrides or [])


def load(path: Optional[str], overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (following ``extends:``), apply ``--set`` overrides, validate."""
    where = f" (in {path})" if path else ""
    return from_dict(load_raw(path, overrides), where)


# ---------------------------------------------------------------- validation

def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Raise ConfigError for combinations that cannot run; world_size adds layout checks."""
    m, p = cfg.model, cfg.parallel
    positive = {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.num_heads": m.num_heads, "model.seq_length": m.seq_length,
        "parallel.tensor": p.tensor, "parallel.pipeline": p.pipeline,
        "train.iters": cfg.train.iters, "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.log_interval": cfg.train.log_interval, "train.eval_interval": cfg.train.eval_interval,
        "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})"
        )
    if m.num_heads % m.kv_heads:
        raise ConfigError(f"model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads ({m.kv_heads})")
    if m.num_heads % p.tensor:
        raise ConfigError(
            f"model.num_heads ({m.num_heads}) must be divisible by parallel.tensor ({p.tensor}): "
            "each tensor-parallel rank holds whole attention heads"
        )
    if m.kv_heads % p.tensor:
        raise ConfigError(f"model.num_kv_heads ({m.kv_heads}) must be divisible by parallel.tensor ({p.tensor})")
    if m.ffn_size % p.tensor:
        raise ConfigError(f"model.ffn_hidden_size ({m.ffn_size}) must be divisible by parallel.tensor ({p.tensor})")
    if m.num_layers % p.pipeline:
        raise ConfigError(
            f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline ({p.pipeline}) "
            "so every pipeline stage holds the same number of blocks"
        )
    if p.sequence_parallel and m.seq_length % p.tensor:
        raise ConfigError(f"model.seq_length ({m.seq_length}) must be divisible by parallel.tensor for sequence_parallel")
    if m.position == "rope" and (m.hidden_size // m.num_heads) % 2:
        raise ConfigError("model.position=rope needs an even head dimension (hidden_size / num_heads)")
    if cfg.zero.stage >= 2 and p.pipeline > 1:
        raise ConfigError(
            f"zero.stage={cfg.zero.stage} cannot be combined with parallel.pipeline={p.pipeline}: "
            "DeepSpeed refuses ZeRO-2/3 with pipeline parallelism. Write --set zero.stage=1 (or 0), "
            "or use configs/ds/zero1_bf16.json"
        )
    if (cfg.zero.offload_optimizer or cfg.zero.offload_params) and cfg.zero.stage == 0:
        raise ConfigError("zero.offload_optimizer / zero.offload_params need zero.stage >= 1 (params: stage 3)")
    if cfg.zero.offload_params and cfg.zero.stage != 3:
        raise ConfigError("zero.offload_params needs zero.stage=3")
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be divisible by "
            f"train.micro_batch_size ({cfg.train.micro_batch_size})"
        )
    for key, value in (("model.hidden_dropout", m.hidden_dropout), ("model.attention_dropout", m.attention_dropout),
                       ("objective.mask_prob", cfg.objective.mask_prob)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if cfg.objective.plm_k < 1:
        raise ConfigError(f"objective.plm_k must be at least 1, got {cfg.objective.plm_k}")
    validate_values(cfg)
    if world_size is not None:
        validate_layout(cfg, world_size)


BUILTIN_OBJECTIVES = {"clm": "gpt", "mlm": "bert", "plm": "gpt"}  # objective -> the model.arch it trains
_SPLIT = re.compile(r"^\s*\d+(\.\d*)?(\s*[,/]\s*\d+(\.\d*)?){0,2}\s*$")


def _check_blend(prefix: Any) -> None:
    """data.prefix: one prefix, a list of prefixes, or [w1, p1, w2, p2, ...] with weights >= 0."""
    if prefix is None or isinstance(prefix, str):
        return
    items = list(prefix)
    if not items:
        raise ConfigError("data.prefix is an empty list: give a prefix, or a blend like "
                          "--set 'data.prefix=[0.7, data/a_text_document, 0.3, data/b_text_document]'")
    if all(isinstance(x, str) for x in items):
        return
    example = "--set 'data.prefix=[0.7, data/a_text_document, 0.3, data/b_text_document]'"
    if len(items) % 2:
        raise ConfigError(f"data.prefix blend has {len(items)} items; it must alternate weight, prefix "
                          f"(an even count), e.g. {example}")
    weights = items[0::2]
    for w, pfx in zip(weights, items[1::2]):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not isinstance(pfx, str):
            raise ConfigError(f"data.prefix blend must alternate a number and a prefix string; got {w!r}, {pfx!r} "
                              f"(e.g. {example})")
        if w < 0:
            raise ConfigError(f"data.prefix blend weight {w} (before {pfx!r}) is negative; weights must be >= 0")
    if sum(weights) <= 0:
        raise ConfigError(f"data.prefix blend weights {weights} sum to 0; at least one must be positive")


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(m: ModelConfig) -> None:
    """model.rope_scaling: Llama-3's frequency-dependent scaling is the one megalm implements."""
    rs = m.rope_scaling or {}
    kind = rs.get("type", rs.get("rope_type"))
    if m.position != "rope":
        raise ConfigError(f"model.rope_scaling needs model.position=rope, got {m.position!r}")
    if kind != "llama3":
        raise ConfigError(f"model.rope_scaling type {kind!r} is not supported: megalm implements 'llama3' "
                          "(Llama 3.1+); set model.rope_scaling=null for plain RoPE")
    missing = [k for k in ROPE_SCALING_KEYS if not isinstance(rs.get(k), (int, float)) or isinstance(rs.get(k), bool)]
    if missing:
        raise ConfigError(f"model.rope_scaling (llama3) needs numbers for {', '.join(missing)}; e.g. "
                          "{type: llama3, factor: 8, low_freq_factor: 1, high_freq_factor: 4, "
                          "original_max_position_embeddings: 8192}")
    if not (rs["factor"] >= 1 and 0 < rs["low_freq_factor"] < rs["high_freq_factor"]
            and rs["original_max_position_embeddings"] >= 1):
        raise ConfigError("model.rope_scaling (llama3) needs factor >= 1, 0 < low_freq_factor < high_freq_factor "
                          f"and original_max_position_embeddings >= 1; got {rs}")
    unknown = sorted(set(rs) - set(ROPE_SCALING_KEYS) - {"type", "rope_type"})
    if unknown:
        raise ConfigError(f"model.rope_scaling has unknown keys {unknown}; llama3 takes {', '.join(ROPE_SCALING_KEYS)}")


def validate_values(cfg: Config) -> None:
    """Value rules a run would otherwise discover minutes in: ranges, choices, objective vs model, schedule."""
    m, o, t, opt = cfg.model, cfg.objective, cfg.train, cfg.optim
    _check_blend(cfg.data.prefix)
    if not _SPLIT.match(str(cfg.data.split)) or not any(float(x) for x in re.findall(r"[.0-9]+", cfg.data.split)):
        raise ConfigError(f"data.split must be 1-3 comma-separated non-negative numbers with one positive, "
                          f"like --set data.split=969,30,1; got {cfg.data.split!r}")
    if o.name not in BUILTIN_OBJECTIVES and ":" not in o.name:
        raise ConfigError(f"objective.name must be one of {', '.join(BUILTIN_OBJECTIVES)} or 'package.module:Class'; "
                          f"got {o.name!r}")
    if m.rope_scaling is not None:
        _check_rope_scaling(m)
    if m.position == "learned" and m.max_positions < m.seq_length:
        raise ConfigError(f"model.max_position_embeddings ({m.max_positions}) is shorter than model.seq_length "
                          f"({m.seq_length}) with learned positions; set --set model.max_position_embeddings="
                          f"{m.seq_length} or shorten model.seq_length")
    at_least = {  # key: (value, minimum)
        "optim.warmup_iters": (opt.warmup_iters, 0), "train.eval_iters": (t.eval_iters, 0),
        "train.exit_interval": (t.exit_interval, 0), "train.max_skipped_steps": (t.max_skipped_steps, 0),
        "checkpoint.interval": (cfg.checkpoint.interval, 0), "checkpoint.keep": (cfg.checkpoint.keep, 1),
        "checkpoint.keep_every": (cfg.checkpoint.keep_every, 0), "data.num_workers": (cfg.data.num_workers, 0),
        "objective.max_span_length": (o.max_span_length, 1), "model.num_token_types": (m.num_token_types, 0),
        "zero.reduce_bucket_size": (cfg.zero.reduce_bucket_size, 1),
        "loss_scale.loss_scale_window": (cfg.loss_scale.loss_scale_window, 1),
        "loss_scale.hysteresis": (cfg.loss_scale.hysteresis, 1),
    }
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key} must be at least {low}, got {value}")
    for key, value in (("model.num_kv_heads", m.num_kv_heads), ("model.vocab_size", m.vocab_size),
                       ("model.ffn_hidden_size", m.ffn_hidden_size),
                       ("model.max_position_embeddings", m.max_position_embeddings),
                       ("optim.decay_iters", opt.decay_iters)):
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be at least 1 (or null for the default), got {value}")
    positive = {"optim.lr": opt.lr, "optim.eps": opt.eps, "model.norm_eps": m.norm_eps,
                "model.init_std": m.init_std, "model.rope_base": m.rope_base,
                "loss_scale.min_loss_scale": cfg.loss_scale.min_loss_scale}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if t.peak_tflops is not None and not t.peak_tflops > 0:
        raise ConfigError(f"train.peak_tflops must be positive (or null to guess from the device), got {t.peak_tflops}")
    if t.exit_duration_minutes is not None and not t.exit_duration_minutes > 0:
        raise ConfigError(f"train.exit_duration_minutes must be positive (or null), got {t.exit_duration_minutes}")
    if not 0 <= opt.min_lr <= opt.lr:
        raise ConfigError(f"optim.min_lr ({opt.min_lr}) must be in [0, optim.lr = {opt.lr}]")
    for key, value in (("optim.weight_decay", opt.weight_decay), ("optim.clip_grad", opt.clip_grad)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, value in (("optim.beta1", opt.beta1), ("optim.beta2", opt.beta2)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if not 0 < opt.wsd_decay_fraction <= 1:
        raise ConfigError(f"optim.wsd_decay_fraction must be in (0, 1], got {opt.wsd_decay_fraction}")


def validate_run(cfg: Config) -> None:
    """Rules for a config that is to be trained (pretrain.py, `megalm check`, `megalm config show`), beyond
    what building a model needs: the objective must match the architecture it trains."""
    o, m = cfg.objective, cfg.model
    wants = BUILTIN_OBJECTIVES.get(o.name)
    if wants and m.arch != wants:
        fix = "configs/bert_base.yaml" if wants == "bert" else "configs/gpt_125m.yaml"
        raise ConfigError(f"objective.name={o.name} trains a model.arch={wants} model, but model.arch={m.arch}; "
                          f"set --set model.arch={wants} (and its shape, e.g. extends {fix}) or pick another objective")


def schedule_warnings(cfg: Config) -> list[str]:
    """Legal but almost certainly unintended schedules (a preset's warmup on a short smoke run, say)."""
    opt, iters = cfg.optim, cfg.train.iters
    decay = opt.decay_iters or iters
    out = []
    if opt.warmup_iters > iters:
        out.append(f"optim.warmup_iters ({opt.warmup_iters}) is longer than the run (train.iters={iters}): the "
                   f"LR never reaches optim.lr; set --set optim.warmup_iters={max(iters // 10, 0)}")
    elif opt.warmup_iters > decay:
        out.append(f"optim.warmup_iters ({opt.warmup_iters}) is longer than optim.decay_iters ({decay}); "
                   f"set --set optim.decay_iters={iters} or shorten the warmup")
    if cfg.train.eval_iters > 0 and cfg.train.eval_interval > iters:
        out.append(f"train.eval_interval ({cfg.train.eval_interval}) is longer than the run "
                   f"(train.iters={iters}): only the final evaluation runs")
    return out


def validate_layout(cfg: Config, world_size: int) -> None:
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} must be divisible by parallel.tensor x parallel.pipeline = {tp} x {pp} = "
            f"{tp * pp}; change --world-size / the Slurm task count, or --set parallel.tensor / parallel.pipeline"
        )
    dp = world_size // (tp * pp)
    mb, gb = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if gb % (mb * dp):
        per_rank = gb // dp if gb % dp == 0 else 0
        fits = [d for d in range(min(mb, per_rank), 0, -1) if per_rank % d == 0]
        fix = (f"--set train.micro_batch_size={fits[0]}" if fits else
               f"--set train.global_batch_size={-(-gb // (mb * dp)) * mb * dp}")
        raise ConfigError(
            f"train.global_batch_size ({gb}) must be divisible by train.micro_batch_size x data-parallel size "
            f"= {mb} x {dp} = {mb * dp} (world {world_size} / tensor {tp} / pipeline {pp}); write {fix}"
        )


# ---------------------------------------------------------------- DeepSpeed

def bf16_fp32_grads(zero: dict) -> dict:
    """bf16: accumulate and all-reduce gradients in fp32, as Megatron does (bf16 sums lose ~3 digits).

    DeepSpeed 0.19 honours ``data_types.grad_accum_dtype=fp32`` only with ZeRO >= 1 (ZeRO-0 raises
    "unsupported mix"), so zero.stage=0 runs DeepSpeed's stage-1 bf16 optimizer: the same maths, the
    optimizer state split over the data-parallel ranks (none with one). ``communication_data_type``
    makes the gradient all-reduce fp32 too (its bf16 default would round the fp32 sums first).
    Edits ``zero`` in place; returns the top-level keys to add.
    """
    if zero["stage"] == 0:
        zero["stage"] = 1
    return {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}


def pipe_sends_whole(cfg: Config) -> bool:
    """Whether stage-to-stage tensors must travel whole instead of DeepSpeed's TP-partitioned transfer.

    DeepSpeed splits the activation (and its gradient) across the TP ranks and all-gathers it on the
    next stage, which assumes every TP rank holds the same tensor. Under sequence parallelism each
    holds its own slice of the sequence (already 1/TP of the bytes), so each sends that slice as is to
    the same TP rank of the next stage. PLM sends two grad-carrying streams (h, g); the partitioned
    transfer carries only the first.
    """
    p = cfg.parallel
    if p.pipeline == 1 or p.tensor == 1:
        return False
    return p.sequence_parallel or cfg.objective.name == "plm"


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON that realises ``cfg`` on ``world_size`` ranks."""
    validate_layout(cfg, world_size)
    z = cfg.zero
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage > 0:
        zero.update(overlap_comm=z.overlap_comm, contiguous_gradients=z.contiguous_gradients,
                    reduce_bucket_size=z.reduce_bucket_size)
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    ls = cfg.loss_scale
    extra: dict[str, Any] = {}
    if cfg.precision == "bf16":
        extra.update(bf16_fp32_grads(zero))
    if pipe_sends_whole(cfg):
        extra["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return {
        **extra,
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": ls.initial_scale_power,
            "loss_scale_window": ls.loss_scale_window,
            "hysteresis": ls.hysteresis,
            "min_loss_scale": ls.min_loss_scale,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# DeepSpeed JSON path -> megalm key, for folding a user's --ds-config into the config.
_DS_TO_MEGALM = {
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("train_batch_size",): "train.global_batch_size",
    ("gradient_clipping",): "optim.clip_grad",
    ("zero_optimization", "stage"): "zero.stage",
    ("zero_optimization", "overlap_comm"): "zero.overlap_comm",
    ("zero_optimization", "contiguous_gradients"): "zero.contiguous_gradients",
    ("zero_optimization", "reduce_bucket_size"): "zero.reduce_bucket_size",
    ("fp16", "initial_scale_power"): "loss_scale.initial_scale_power",
    ("fp16", "loss_scale_window"): "loss_scale.loss_scale_window",
    ("fp16", "hysteresis"): "loss_scale.hysteresis",
    ("fp16", "min_loss_scale"): "loss_scale.min_loss_scale",
}


def _get_path(d: dict, path: tuple) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _get_dotted(d: dict, key: str) -> Any:
    return _get_path(d, tuple(key.split(".")))


def read_ds_config(path: str) -> dict:
    from megalm.jsonfile import read_json

    return read_json(path, ConfigError, "the --ds-config DeepSpeed JSON")


def fold_ds_config(raw: dict, ds: dict, ds_path: str, explicit: Optional[dict] = None) -> dict:
    """Adopt the settings a ``--ds-config`` JSON makes: they win over the YAML (a model preset's
    defaults), never over an explicit ``--set``; a ``--set`` that contradicts the JSON is an error
    that names the ``--set`` to write.

    ``raw`` is the merged YAML + overrides; ``explicit`` the ``--set`` items alone (as a nested dict).
    """
    explicit = explicit or {}
    fp16 = bool(_get_path(ds, ("fp16", "enabled")))
    bf16 = bool(_get_path(ds, ("bf16", "enabled")) or _get_path(ds, ("bfloat16", "enabled")))
    if fp16 and bf16:
        raise ConfigError(f"{ds_path}: fp16.enabled and bf16.enabled are both true; pick one precision")
    adopted: dict[str, Any] = {}
    if fp16 or bf16:
        adopted["precision"] = "fp16" if fp16 else "bf16"
    elif _get_path(ds, ("fp16", "enabled")) is False or _get_path(ds, ("bf16", "enabled")) is False:
        adopted["precision"] = "fp32"
    for path, key in _DS_TO_MEGALM.items():
        value = _get_path(ds, path)
        if value is not None and value != "auto":
            adopted[key] = value
    if _get_path(ds, ("zero_optimization", "offload_optimizer", "device")) == "cpu":
        adopted["zero.offload_optimizer"] = True
    if _get_path(ds, ("zero_optimization", "offload_param", "device")) == "cpu":
        adopted["zero.offload_params"] = True
    out = json.loads(json.dumps(raw))
    for key, value in adopted.items():
        mine = _get_dotted(explicit, key)
        if mine is not None and mine != value:
            raise ConfigError(
                f"{ds_path} sets {key.split('.')[-1]}={value!r} but --set {key}={mine!r} says otherwise; "
                f"write --set {key}={json.dumps(value)} (or drop that --set) to use the JSON's value, "
                f"or change it in {ds_path}"
            )
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    # A preset that sets the micro batch but whose JSON fixes only the global one (or the reverse)
    # must still divide: say which --set makes them agree.
    gb, mb = _get_dotted(out, "train.global_batch_size"), _get_dotted(out, "train.micro_batch_size")
    if isinstance(gb, int) and isinstance(mb, int) and mb > 0 and gb % mb:
        raise ConfigError(f"{ds_path} with the config gives train.global_batch_size={gb} and "
                          f"train.micro_batch_size={mb}, which does not divide; write "
                          f"--set train.micro_batch_size={math.gcd(gb, mb)}")
    return out


def check_ds_batch(cfg: Config, ds: dict, ds_path: str, world_size: int) -> None:
    """gradient_accumulation_steps in a --ds-config must agree with the derived value."""
    ga = ds.get("gradient_accumulation_steps")
    if ga not in (None, "auto") and ga != cfg.grad_accum_steps(world_size):
        raise ConfigError(
            f"{ds_path} sets gradient_accumulation_steps={ga}, but train.global_batch_size / "
            f"(micro_batch_size x data-parallel size) = {cfg.grad_accum_steps(world_size)} on {world_size} ranks"
        )


def merge_ds_config(derived: dict, ds: dict) -> dict:
    """The JSON handed to DeepSpeed: the user's file with megalm's derived values filled in."""
    out = json.loads(json.dumps(ds))
    for k, v in derived.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**v, **{kk: vv for kk, vv in out[k].items() if vv != "auto"}}
            for kk, vv in v.items():
                if kk in ("stage", "enabled") or (k, kk) in _DS_TO_MEGALM:  # folded into cfg already
                    out[k][kk] = vv
        elif out.get(k) in (None, "auto"):
            out[k] = v
    out["train_batch_size"] = derived["train_batch_size"]
    out["train_micro_batch_size_per_gpu"] = derived["train_micro_batch_size_per_gpu"]
    out["gradient_accumulation_steps"] = derived["gradient_accumulation_steps"]
    out["gradient_clipping"] = derived["gradient_clipping"]
    if "pipeline" in derived:  # correctness, not a preference: a user's JSON cannot turn it back on
        out["pipeline"] = {**(out.get("pipeline") or {}), **derived["pipeline"]}
    return out


def resolve(
    path: Optional[str],
    overrides: Optional[list[str]] = None,
    ds_config: Optional[str] = None,
    world_size: Optional[int] = None,
) -> tuple[Config, dict]:
    """The whole resolution an entry point needs: (Config, DeepSpeed JSON)."""
    raw = load_raw(path, overrides)
    ds_user = read_ds_config(ds_config) if ds_config else {}
    if ds_config:
        raw = fold_ds_config(raw, ds_user, ds_config, apply_overrides({}, overrides or []))
    where = f" (in {path})" if path else ""
    cfg = from_dict(raw, where)
    validate_run(cfg)
    ws = world_size or cfg.parallel.tensor * cfg.parallel.pipeline
    validate(cfg, ws)
    ds = deepspeed_config(cfg, ws)
    if ds_config:
        check_ds_batch(cfg, ds_user, ds_config, ws)
        ds = merge_ds_config(ds, ds_user)
    return cfg, ds


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _type_name(hint: Any) -> str:
    """How the reference writes a field's type: a choice as its values, else the annotation."""
    if typing.get_origin(hint) is Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def reference_table() -> str:
    """Markdown table of every key, its type, default and meaning: the README's config reference."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str, inst: Any) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint, value = hints[f.name], getattr(inst, f.name)
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + f.name + ".", value)
                continue
            cells = (_type_name(hint), f.metadata.get("help", ""))
            t, note = (c.replace("|", "\\|") for c in cells)
            rows.append(f"| `{prefix + f.name}` | {t} | `{json.dumps(value)}` | {note} |")

    walk(Config, "", Config())
    return "\n".join(rows)
