"""``megalm plan``: memory per GPU for a config, and the parallel layouts (TP, PP, DP, ZeRO, micro batch,
activation checkpointing) that fit a cluster -- arithmetic only, nothing is built or allocated.

    megalm plan configs/gpt_1b.yaml --gpus 64 --gpu-mem 80

The model is the one megalm builds (megalm/model): parameter counts follow its layers exactly, and the
activation terms count the tensors autograd keeps for backward in its blocks (tests/launch/test_plan.py
checks both against the real model, and a whole CPU training run against its peak memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass
from typing import Iterator, Optional

from megalm.config import Config, ZeroStage, load, validate
from megalm.errors import ConfigError

GB = 1024**3
OVERHEAD_GB = 2.0  # assumed, not measured: CUDA context, NCCL buffers, allocator slack per GPU
HEADROOM = 0.9  # a layout "fits" under this fraction of the GPU's memory
# Step-time factor of each train.activation_checkpointing mode (a rule of thumb, see relative_step_time),
# cheapest first: the order layouts are tried in. tests/launch/test_plan.py checks it covers every mode.
RECOMPUTE_COST = {"none": 1.0, "selective": 1.03, "full": 1.33}
RECOMPUTE = tuple(RECOMPUTE_COST)


@dataclass(frozen=True)
class Layout:
    """How the model is split: tensor x pipeline x data ranks, ZeRO stage, micro batch, recompute."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    micro_batch: int = 1
    recompute: str = "none"  # train.activation_checkpointing
    sequence_parallel: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def label(self) -> str:
        sp = "+SP" if self.sequence_parallel else ""
        return f"TP{self.tp}{sp} PP{self.pp} DP{self.dp} ZeRO{self.zero} mb{self.micro_batch} {self.recompute}"


@dataclass(frozen=True)
class ParamCount:
    """Parameters of the whole model (unsplit)."""

    embedding: int  # word table (+ positions, token types, LM bias)
    per_layer: int
    num_layers: int
    head: int  # untied output projection, final norm, BERT pooler/MLM transform/binary head
    padded_vocab: int

    @property
    def total(self) -> int:
        return self.embedding + self.per_layer * self.num_layers + self.head


@dataclass(frozen=True)
class Estimate:
    """Bytes on the busiest GPU of a layout. ``weights + grads + optimizer`` is the model state that stays
    allocated (the measured rule in ``model_state_bytes``); the rest is counted or assumed (see SOURCES)."""

    layout: Layout
    params_per_gpu: int
    weights: float
    grads: float
    optimizer: float  # fp32 master weights, Adam moments, fp32 gradient accumulation buffers
    step_temporaries: float  # during optimizer.step: the fp32 gradient cast and AdamW's temporaries
    activations: float
    buffers: float  # ZeRO buckets / prefetch, fp32 logits for the loss
    overhead: float  # CUDA context, NCCL, allocator slack: a constant
    startup: float = 0.0  # peak while the model is built, before DeepSpeed partitions / casts it
    save_host: float = 0.0  # host (CPU) memory this rank's checkpoint shard takes while it is saved

    @property
    def model_state(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.step_temporaries + self.activations
                + self.buffers + self.overhead)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) / GB for k in ("weights", "grads", "optimizer", "step_temporaries", "activations",
                                                  "buffers", "overhead", "total", "startup", "save_host")}
        return {"layout": dataclasses.asdict(self.layout), "params_per_gpu": self.params_per_gpu,
                **{f"{k}_gb": round(v, 4) for k, v in d.items()}}


# Where each number comes from; `megalm plan` prints this beside its table.
SOURCES = {
    "weights, grads, optimizer": "measured: DeepSpeed 0.19.8 allocations on CPU (gloo), fitted per ZeRO stage and "
                                 "precision at two model sizes and DP 1 and 2 (tests/launch/test_plan.py)",
    "activations": "counted: the tensors autograd saves in megalm's blocks, on CPU (tests/launch/test_plan.py)",
    "step temporaries": "measured on CPU as part of whole-run peak memory (torch AdamW; the fp32 cast of bf16 "
                        "gradients; none under BF16_Optimizer, whose fp32 gradients fused AdamW reads in place)",
    "buffers": "assumed: logits + fp32 copy + gradient; ZeRO buckets and ZeRO-3 prefetch from the config",
    "overhead": "assumed: --overhead GB (CUDA context, NCCL, allocator slack); not yet measured on a GPU",
    "startup, save (host)": "assumed: the model built in fp32 before DeepSpeed casts/partitions it; a checkpoint "
                            "shard copied to host memory whole while it is written; not measured",
}


def deepspeed_view(cfg: Config, layout: Layout) -> tuple[int, bool]:
    """(the ZeRO stage DeepSpeed really runs, whether it accumulates bf16 gradients in fp32), read from the
    DeepSpeed JSON megalm derives for ``layout``: bf16 asks for fp32 accumulation, which DeepSpeed honours
    only with ZeRO >= 1, so megalm runs bf16 ZeRO-0 as stage 1 (megalm.config.bf16_fp32_grads)."""
    try:
        from megalm.config import deepspeed_config

        ds = deepspeed_config(with_layout(cfg, layout), layout.tp * layout.pp)
    except ConfigError:  # a layout the trainer refuses: the plain reading
        return layout.zero, False
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype") in ("fp32", "float32")
    return int(ds["zero_optimization"]["stage"]), accum and cfg.precision == "bf16"


def model_state_bytes(cfg: Config, layout: Layout, params: int) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes for ``params`` parameters on one rank: what DeepSpeed 0.19
    allocates, measured on CPU (bytes per parameter at DP=1 / DP=2):

    fp32  ZeRO-0 16/16 (4 w + 4 g + 8 Adam)   ZeRO-1/2 20/12 (4 w + (4 g + 4 fp32 copy + 8 Adam)/DP)
          ZeRO-3 20/10 (all of it / DP)
    bf16  ZeRO-0 16/16 (2 w + 2 g + 4 master + 8 Adam)   ZeRO-1/2 16/9 (2 w + (2 g + 12)/DP)
          ZeRO-3 16/8; with fp32 gradient accumulation (data_types.grad_accum_dtype: fp32): ZeRO-1 20/14
          (DeepSpeed's BF16_Optimizer: bf16 and fp32 gradients both whole), ZeRO-2 -/10, ZeRO-3 -/9
          (fp32 gradient partitions)

    DeepSpeed's ZeRO-1 reduces gradients into partitions as ZeRO-2 does, so both divide them by DP.
    megalm's derived JSON asks for fp32 accumulation with bf16 and so runs bf16 ZeRO-0 as stage 1
    (``deepspeed_view``). fp16 is taken to be bf16's rule (not run: DeepSpeed refuses fp16 on CPU).
    """
    mixed = cfg.precision in ("bf16", "fp16")
    e = 2 if mixed else 4
    z, fp32_accum = deepspeed_view(cfg, layout)
    dp = layout.dp
    weights = params * e / (dp if z >= 3 else 1)
    grads = params * e / (dp if z >= 1 else 1)
    # fp32 runs under ZeRO keep their own fp32 copy of the partition; mixed precision its master weights
    copy = 4 if (mixed or z >= 1) else 0
    optimizer = params * (8 + copy) / (dp if z >= 1 else 1)
    if fp32_accum:
        if z <= 1:  # BF16_Optimizer keeps the bf16 gradients and an fp32 copy, both whole
            grads = params * e
            optimizer += params * 4
        else:  # ZeRO-2/3 keep their gradient partitions in fp32 instead of bf16
            grads = params * 4 / dp
    if cfg.zero.offload_optimizer and z >= 1:
        optimizer = 0.0  # master weights and moments live in host memory
    return weights, grads, optimizer


# ------------------------------------------------------------------ parameters

def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return (vocab + multiple - 1) // multiple * multiple


def count_parameters(cfg: Config, vocab_size: Optional[int] = None, tp: int = 1) -> ParamCount:
    """Parameter counts of megalm's GPT / BERT model for ``cfg`` (vocab from the config unless given)."""
    m = cfg.model
    vocab = vocab_size or m.vocab_size
    if not vocab:
        raise ConfigError("model.vocab_size is not set in the config: pass --vocab (the tokenizer's size)")
    h, f, d = m.hidden_size, m.ffn_size, m.hidden_size // m.num_heads
    pv = padded_vocab(vocab, m.make_vocab_size_divisible_by, tp)
    norm = 2 * h if m.norm == "layernorm" else h
    q, kv = m.num_heads * d, m.kv_heads * d
    attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) + h if m.bias else 0)
    up = 2 * f if m.activation == "swiglu" else f
    mlp = h * up + f * h + (up + h if m.bias else 0)
    per_layer = attn + mlp + 2 * norm
    emb = pv * h
    if m.position == "learned":
        emb += m.max_positions * h
    emb += m.num_token_types * h
    if m.norm_position == "post":
        emb += norm  # post-LN models normalise the embedding output
    if m.arch == "gpt" and cfg.objective.name == "plm":
        emb += h  # the query stream's start vector
    head = norm if m.norm_position == "pre" else 0  # final norm
    if m.arch == "bert":
        emb += pv  # MLM decoder bias, kept with the tied word table
        head += h * h + h + norm  # MLM transform dense + norm
        if cfg.objective.binary_head != "none":
            head += (h * h + h) + (2 * h + 2)  # pooler + binary classifier
    elif not m.tie_embeddings:
        head += pv * h
    return ParamCount(embedding=emb, per_layer=per_layer, num_layers=m.num_layers, head=head, padded_vocab=pv)


def _split_layer_params(cfg: Config, tp: int) -> float:
    """One block's parameters on one TP rank: matmuls split, norms (and row-parallel biases) replicated."""
    m = cfg.model
    h, f, d = m.hidden_size, m.ffn_size, m.hidden_size // m.num_heads
    q, kv = m.num_heads * d, m.kv_heads * d
    norm = 2 * h if m.norm == "layernorm" else h
    up = 2 * f if m.activation == "swiglu" else f
    split = h * (q + 2 * kv) + q * h + h * up + f * h + ((q + 2 * kv) + up if m.bias else 0)
    replicated = 2 * norm + (2 * h if m.bias else 0)
    return split / tp + replicated


def params_per_gpu(cfg: Config, layout: Layout, vocab_size: Optional[int] = None) -> int:
    """Parameters held by the busiest rank (the first or last pipeline stage) before ZeRO partitioning."""
    counts = count_parameters(cfg, vocab_size, layout.tp)
    m, tp = cfg.model, layout.tp
    layers = _split_layer_params(cfg, tp) * (m.num_layers // layout.pp)
    word = counts.padded_vocab * m.hidden_size
    emb_rest = counts.embedding - word
    emb = word / tp + emb_rest  # positions / token types replicated; the LM bias is split like the table
    if m.arch == "bert":
        emb += -counts.padded_vocab + counts.padded_vocab / tp
    untied_head = m.arch == "gpt" and not m.tie_embeddings
    head = counts.head - (word if untied_head else 0) + (word / tp if untied_head else 0)
    if layout.pp == 1:
        return int(emb + layers + head)
    tied_copy = word / tp if m.tie_embeddings else 0  # the last stage keeps a tied copy of the word table
    first, last = emb + layers, layers + head + tied_copy
    return int(max(first, last))


# ------------------------------------------------------------------ activations

def activation_bytes_per_layer(cfg: Config, layout: Layout, element_bytes: int) -> float:
    """Bytes one block keeps for backward for one micro batch (the tensors autograd saves)."""
    m = cfg.model
    s, b, h, t = m.seq_length, layout.micro_batch, m.hidden_size, layout.tp
    f, d = m.ffn_size, m.hidden_size // m.num_heads
    q, kv = m.num_heads * d, m.kv_heads * d
    sp = layout.sequence_parallel and t > 1
    rep = t if sp else 1  # hidden-size tensors outside the TP regions are split only under SP
    if layout.recompute == "full":
        return s * b * h / rep * element_bytes  # the block's input only
    # Counted on megalm's blocks with saved-tensor hooks (tests/launch/test_plan.py): each norm keeps its
    # input and its output (which the next matmul saves); RMSNorm's unfused path keeps one more h-sized
    # tensor in fp32 and its fp32 upcast (two bf16-sized units) in bf16.
    if m.norm == "layernorm":
        norm_saves = 2.0
    else:
        norm_saves = 3.0 if element_bytes == 4 else 4.0
    per_token = 0.0
    per_token += 2 * norm_saves * h / rep  # the two norms
    per_token += (q + 2 * kv) / t  # qkv output (q, k, v views keep it alive)
    if m.position == "rope":
        per_token += (q + kv) / t  # q, k after rotation
    per_token += q / t  # the attention kernel's output (a view of it feeds the output projection)
    if layout.recompute != "selective" and m.attention_dropout > 0:
        # fused (flash / memory-efficient) kernels keep no s x s scores; with attention dropout the
        # non-fused path keeps the probabilities and a byte mask: what selective recompute saves
        per_token += (m.num_heads / t) * s * (1 + 1 / element_bytes)
    per_token += (4 * f if m.activation == "swiglu" else 2 * f) / t  # fc1 out, activation, fc2 input
    if m.hidden_dropout > 0:
        per_token += 2 * (h / rep) / element_bytes  # two byte masks
    return s * b * per_token * element_bytes


def activation_bytes(cfg: Config, layout: Layout, element_bytes: int, grad_accum: int) -> float:
    """Activations of the busiest stage: its layers x the micro batches in flight (1F1B: up to PP)."""
    m = cfg.model
    layers = m.num_layers // layout.pp
    in_flight = min(layout.pp, grad_accum) if layout.pp > 1 else 1
    per_layer = activation_bytes_per_layer(cfg, layout, element_bytes)
    total = per_layer * layers * in_flight
    one_block = activation_bytes_per_layer(cfg, dataclasses.replace(layout, recompute="none"), element_bytes)
    if layout.recompute == "full":  # backward re-runs one block at a time with everything saved
        total += one_block
    # backward's workspace: the gradients flowing through one block; fp32-sized in bf16/fp16 runs, whose
    # norms compute their backward in fp32 (measured on CPU)
    total += one_block * 4 / element_bytes
    s, b, h = m.seq_length, layout.micro_batch, m.hidden_size
    total += s * b * h * element_bytes * 2 * in_flight  # embedding output, final norm
    return total


def logits_bytes(cfg: Config, layout: Layout, element_bytes: int, vocab_size: Optional[int] = None) -> float:
    """The last stage's logits shard, its fp32 copy for the vocab-parallel loss, and its gradient."""
    m = cfg.model
    pv = count_parameters(cfg, vocab_size, layout.tp).padded_vocab
    n = m.seq_length * layout.micro_batch * pv / layout.tp
    return n * (element_bytes + 4 + 4)


# ------------------------------------------------------------------ the estimate

def zero_bucket_bytes(cfg: Config, layout: Layout) -> float:
    """The gradient reduce bucket(s) ZeRO-2/3 allocate up front: ``zero.reduce_bucket_size`` elements of
    the gradient dtype (fp32 when bf16 accumulates in fp32), two with ``overlap_comm`` (one measured on
    CPU for ZeRO-3, fp32 and bf16)."""
    if layout.zero < 2:
        return 0.0
    fp32_grads = cfg.precision == "fp32" or deepspeed_view(cfg, layout)[1]  # bf16 accumulating in fp32
    e = 4 if fp32_grads else 2
    return cfg.zero.reduce_bucket_size * e * (2 if cfg.zero.overlap_comm else 1)


def estimate(cfg: Config, layout: Layout, vocab_size: Optional[int] = None, overhead_gb: float = 0.0) -> Estimate:
    """Memory of the busiest rank for ``layout``: model state, step temporaries, activations, buffers."""
    mixed = cfg.precision in ("bf16", "fp16")
    e = 2 if mixed else 4
    n = params_per_gpu(cfg, layout, vocab_size)
    dp, z = layout.dp, layout.zero
    weights, grads, optimizer = model_state_bytes(cfg, layout, n)
    z, fp32_accum = deepspeed_view(cfg, layout)
    # optimizer.step: torch's AdamW over fp32 master weights, 4 bytes per parameter of temporaries in fp32
    # runs; with bf16 gradients 12 (DeepSpeed casts the gradient partition to fp32 first, and AdamW's own)
    # (measured as part of whole-run peak memory on CPU, tests/launch/test_plan.py). DeepSpeed's
    # BF16_Optimizer (megalm's bf16 ZeRO-0/1, fp32 accumulation) hands AdamW its fp32 gradient buffer
    # itself -- already counted in the model state, no cast (live tensors at AdamW.step: the model state
    # and nothing more) -- and torch's fused AdamW updates it in place: no temporaries. Counting the fp32
    # step's 4 bytes there put the estimate 9-22% over the measured whole-run peak (mid - tiny difference
    # 0.228-0.255 GB vs 0.279 GB estimated, tests/launch/test_plan.py, 7.4M params); without them it is
    # 0.251 GB. Over the partition under ZeRO >= 1.
    bf16_optimizer = fp32_accum and z <= 1
    step = 0.0 if bf16_optimizer else n * (4 + 8 if mixed else 4) / (dp if z >= 1 else 1)
    if cfg.zero.offload_optimizer and z >= 1:
        step = 0.0
    grad_accum = max(1, cfg.train.global_batch_size // (layout.micro_batch * dp))
    acts = activation_bytes(cfg, layout, e, grad_accum)
    buffers = logits_bytes(cfg, layout, e, vocab_size) + zero_bucket_bytes(cfg, layout)
    if z >= 3:
        buffers += 2 * _split_layer_params(cfg, layout.tp) * e  # a gathered layer or two in flight
    # megalm builds the rank's whole model in fp32 and DeepSpeed then casts and (ZeRO-3) partitions it
    startup = n * (4 + (e if mixed else 0)) + overhead_gb * GB
    save_host = weights + optimizer  # this rank's shard of model and optimizer states, in host memory
    return Estimate(layout, n, weights, grads, optimizer, step, acts, buffers, overhead_gb * GB, startup, save_host)


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def with_layout(cfg: Config, layout: Layout) -> Config:
    """The config with ``layout``'s parallel, ZeRO, micro-batch and recompute settings."""
    return cfg.replace(
        parallel=dataclasses.replace(cfg.parallel, tensor=layout.tp, pipeline=layout.pp,
                                     sequence_parallel=layout.sequence_parallel),
        zero=dataclasses.replace(cfg.zero, stage=layout.zero),
        train=dataclasses.replace(cfg.train, micro_batch_size=layout.micro_batch,
                                  activation_checkpointing=layout.recompute))


def refusal(cfg: Config, layout: Layout) -> Optional[str]:
    """Why megalm (`megalm check`, the trainer) refuses ``layout`` for ``cfg``, or None if it runs."""
    try:
        validate(with_layout(cfg, layout), layout.gpus)
    except ConfigError as e:
        return str(e)
    return None


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int = 8) -> Iterator[Layout]:
    """Every layout megalm runs on ``gpus`` ranks (the trainer's own rules say so): TP within a node."""
    m = cfg.model
    for tp in _divisors(min(gpus, gpus_per_node)):
        for pp in _divisors(m.num_layers):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for mb in (1, 2, 4, 8, 16, 32):
                for zero in typing.get_args(ZeroStage):
                    if dp == 1 and zero > 0:
                        continue  # nothing to partition over
                    for recompute in RECOMPUTE:
                        layout = Layout(tp, pp, dp, zero, mb, recompute, sequence_parallel=tp > 1)
                        if refusal(cfg, layout) is None:
                            yield layout


def relative_step_time(cfg: Config, layout: Layout) -> float:
    """A rough slow-down factor of a layout against an ideal data-parallel run (1.0), to rank the layouts
    that fit. Rules of thumb, not a measurement: recompute costs forward passes, TP talks every layer
    (cheap inside a node), the pipeline idles (pp-1)/microbatches of the time, ZeRO-3 gathers the weights
    every step (costly across nodes), and small micro batches use the GPU poorly."""
    f = RECOMPUTE_COST[layout.recompute]
    f *= 1.0 + 0.06 * (layout.tp.bit_length() - 1)  # +6% per doubling of TP
    micro_batches = max(1, cfg.train.global_batch_size // (layout.micro_batch * layout.dp))
    f *= 1.0 + (layout.pp - 1) / micro_batches
    if layout.dp > 1:
        f *= {0: 1.0, 1: 1.0, 2: 1.01, 3: 1.15 if layout.dp > 8 else 1.05}[layout.zero]
    f *= {1: 1.12, 2: 1.05}.get(layout.micro_batch, 1.0)
    return f


def _cost(cfg: Config, est: Estimate) -> tuple:
    """Preference among layouts that fit: fastest estimated step, then the least memory (headroom)."""
    return (round(relative_step_time(cfg, est.layout), 3), round(est.total / GB, 1), est.layout.tp * est.layout.pp)


def plan(cfg: Config, gpus: int, gpu_mem_gb: float, gpus_per_node: int = 8, vocab_size: Optional[int] = None,
         overhead_gb: float = OVERHEAD_GB, headroom: float = HEADROOM) -> list[Estimate]:
    """Layouts whose estimate fits ``headroom`` x ``gpu_mem_gb``, best first."""
    fits = []
    for layout in candidate_layouts(cfg, gpus, gpus_per_node):
        est = estimate(cfg, layout, vocab_size, overhead_gb)
        if est.total <= headroom * gpu_mem_gb * GB:
            fits.append(est)
    fits.sort(key=lambda e: _cost(cfg, e))
    return fits


def config_layout(cfg: Config, gpus: int) -> Layout:
    """The layout the config itself asks for on ``gpus`` ranks."""
    p = cfg.parallel
    dp = max(1, gpus // (p.tensor * p.pipeline))
    return Layout(p.tensor, p.pipeline, dp, cfg.zero.stage, cfg.train.micro_batch_size,
                  cfg.train.activation_checkpointing, p.sequence_parallel and p.tensor > 1)


# ------------------------------------------------------------------ command line

def _row(e: Estimate) -> str:
    g = [x / GB for x in (e.weights, e.grads, e.optimizer, e.step_temporaries, e.activations, e.buffers,
                          e.overhead, e.total)]
    lay = e.layout
    return (f"{lay.tp:>3}{'+SP' if lay.sequence_parallel else '   '} {lay.pp:>3} {lay.dp:>5} {lay.zero:>5} "
            f"{lay.micro_batch:>3} {lay.recompute:<9} " + " ".join(f"{x:>8.2f}" for x in g))


HEADER = (" TP       PP    DP  ZeRO  mb recompute  weights    grads    optim   step-t    activ  buffers overhead"
          "    total GB")


def _verdict(cfg: Config, est: Estimate, gpu_mem: float) -> str:
    why = refusal(cfg, est.layout)
    if why:
        return f"   REFUSED by megalm check: {why}"
    return "   fits" if est.total <= HEADROOM * gpu_mem * GB else "   DOES NOT FIT"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (configs/*.yaml)")
    p.add_argument("--gpus", type=int, required=True, help="total GPU count")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GB (e.g. 80)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="tensor parallelism stays within a node [8]")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size when the config leaves it to the tokenizer")
    p.add_argument("--overhead", type=float, default=OVERHEAD_GB,
                   help=f"GB per GPU for CUDA context, NCCL, slack; assumed, not measured [{OVERHEAD_GB:g}]")
    p.add_argument("--top", type=int, default=12, help="how many fitting layouts to list [12]")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    if ns.gpus < 1 or ns.gpu_mem <= 0:
        raise ConfigError("--gpus must be at least 1 and --gpu-mem positive")
    cfg = load(ns.config, ns.overrides)
    vocab = ns.vocab or cfg.model.vocab_size or 32000
    counts = count_parameters(cfg, vocab)
    own = estimate(cfg, config_layout(cfg, ns.gpus), vocab, ns.overhead)
    own_refused = refusal(cfg, own.layout)
    fits = plan(cfg, ns.gpus, ns.gpu_mem, ns.gpus_per_node, vocab, ns.overhead)
    if ns.json:
        print(json.dumps({"parameters": counts.total, "config_layout": own.as_dict(), "config_layout_refused": own_refused,
                          "fits": [e.as_dict() for e in fits[:ns.top]], "num_fits": len(fits),
                          "sources": SOURCES}, indent=1))
        return 0
    m = cfg.model
    print(f"{ns.config}: {counts.total / 1e9:.3f}B parameters ({m.num_layers} layers x "
          f"{counts.per_layer / 1e6:.1f}M, embedding {counts.embedding / 1e6:.1f}M, head {counts.head / 1e6:.1f}M; "
          f"vocab {vocab}{'' if cfg.model.vocab_size else ' (assumed; --vocab)'}), {cfg.precision}, "
          f"seq {m.seq_length}, global batch {cfg.train.global_batch_size}")
    print(f"{ns.gpus} GPUs x {ns.gpu_mem:g} GB ({ns.gpus_per_node} per node); overhead {ns.overhead:g} GB/GPU "
          f"(assumed); listing layouts under {HEADROOM:.0%} of memory\n")
    print("the config's own layout:")
    print(HEADER)
    print(_row(own) + _verdict(cfg, own, ns.gpu_mem))
    print(f"  at startup (model built before DeepSpeed partitions it): {own.startup / GB:.2f} GB per GPU; "
          f"host memory while a checkpoint is saved: {own.save_host / GB:.2f} GB per rank "
          f"({own.save_host * min(ns.gpus, ns.gpus_per_node) / GB:.1f} GB per node)")
    print(f"\n{len(fits)} layouts fit; the best {min(ns.top, len(fits))} by a rough step-time rule "
          "(recompute, TP, pipeline bubble, ZeRO-3, micro batch; assumed, not measured):")
    if fits:
        print(HEADER)
        for e in fits[:ns.top]:
            print(_row(e))
    else:
        print("  none: add GPUs, use bigger ones, or shorten model.seq_length")
    print("\nwhere the numbers come from:")
    for what, where in SOURCES.items():
        print(f"  {what}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
