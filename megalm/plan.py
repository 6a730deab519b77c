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
from dataclasses import dataclass
from typing import Iterator, Optional

from megalm.config import Config, load
from megalm.errors import ConfigError

GB = 1024**3
OVERHEAD_GB = 2.0  # assumed, not measured: CUDA context, NCCL buffers, allocator slack per GPU
HEADROOM = 0.9  # a layout "fits" under this fraction of the GPU's memory
RECOMPUTE = ("none", "selective", "full")


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
    """Bytes on the busiest GPU of a layout."""

    layout: Layout
    params_per_gpu: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    buffers: float  # ZeRO buckets / prefetch, fp32 logits for the loss
    overhead: float  # CUDA context, NCCL, allocator slack: a constant

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers + self.overhead

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) / GB for k in ("weights", "grads", "optimizer", "activations", "buffers",
                                                  "overhead", "total")}
        return {"layout": dataclasses.asdict(self.layout), "params_per_gpu": self.params_per_gpu,
                **{f"{k}_gb": round(v, 4) for k, v in d.items()}}


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

def estimate(cfg: Config, layout: Layout, vocab_size: Optional[int] = None, overhead_gb: float = 0.0) -> Estimate:
    """Memory of the busiest rank for ``layout``: weights, grads, optimizer, activations, buffers."""
    mixed = cfg.precision in ("bf16", "fp16")
    e = 2 if mixed else 4
    n = params_per_gpu(cfg, layout, vocab_size)
    dp, z = layout.dp, layout.zero
    weights = n * e / (dp if z >= 3 else 1)
    # Mixed precision: an fp32 gradient buffer beside the 16-bit grads, 4 more bytes. bf16 accumulates and
    # all-reduces in it because megalm sets data_types.grad_accum_dtype=fp32 (DeepSpeed's default is bf16).
    grads = n * (e + (4 if mixed else 0)) / (dp if z >= 2 else 1)
    # Adam m and v in fp32; mixed precision adds the fp32 master weights and the fp32 gradient partition
    # the optimizer steps on. torch's AdamW step builds fp32 temporaries: one per parameter in fp32 runs,
    # two with mixed precision (measured on CPU, tests/launch/test_plan.py). ZeRO-1 and up partition all of
    # it over the data-parallel ranks.
    opt_per_param = 8 + (8 + 8 if mixed else 4)
    optimizer = n * opt_per_param / (dp if z >= 1 else 1)
    if cfg.zero.offload_optimizer and z >= 1:
        optimizer = 0.0
    grad_accum = max(1, cfg.train.global_batch_size // (layout.micro_batch * dp))
    acts = activation_bytes(cfg, layout, e, grad_accum)
    buffers = logits_bytes(cfg, layout, e, vocab_size)
    if z >= 2:
        buffers += cfg.zero.reduce_bucket_size * e * 2  # gradient reduce buckets
    if z >= 3:
        buffers += 2 * _split_layer_params(cfg, layout.tp) * e  # a gathered layer or two in flight
    return Estimate(layout, n, weights, grads, optimizer, acts, buffers, overhead_gb * GB)


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int = 8) -> Iterator[Layout]:
    """Every layout megalm can run on ``gpus`` ranks: TP within a node, PP dividing the layers."""
    m, gb = cfg.model, cfg.train.global_batch_size
    for tp in _divisors(min(gpus, gpus_per_node)):
        if m.num_heads % tp or m.kv_heads % tp or m.ffn_size % tp:
            continue
        for pp in _divisors(m.num_layers):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for mb in (1, 2, 4, 8, 16, 32):
                if gb % (mb * dp):
                    continue
                for zero in (0, 1, 2, 3):
                    if pp > 1 and zero > 1:
                        continue  # DeepSpeed refuses ZeRO-2/3 with pipeline parallelism
                    if dp == 1 and zero > 0:
                        continue  # nothing to partition over
                    for recompute in RECOMPUTE:
                        yield Layout(tp, pp, dp, zero, mb, recompute, sequence_parallel=tp > 1)


def relative_step_time(cfg: Config, layout: Layout) -> float:
    """A rough slow-down factor of a layout against an ideal data-parallel run (1.0), to rank the layouts
    that fit. Rules of thumb, not a measurement: recompute costs forward passes, TP talks every layer
    (cheap inside a node), the pipeline idles (pp-1)/microbatches of the time, ZeRO-3 gathers the weights
    every step (costly across nodes), and small micro batches use the GPU poorly."""
    f = {"none": 1.0, "selective": 1.03, "full": 1.33}[layout.recompute]
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
         overhead_gb: float = 2.0, headroom: float = 0.9) -> list[Estimate]:
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
    g = [x / GB for x in (e.weights, e.grads, e.optimizer, e.activations, e.buffers, e.total)]
    lay = e.layout
    return (f"{lay.tp:>3}{'+SP' if lay.sequence_parallel else '   '} {lay.pp:>3} {lay.dp:>5} {lay.zero:>5} "
            f"{lay.micro_batch:>3} {lay.recompute:<9} " + " ".join(f"{x:>8.2f}" for x in g))


HEADER = (" TP       PP    DP  ZeRO  mb recompute  weights    grads    optim    activ  buffers    total GB")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (configs/*.yaml)")
    p.add_argument("--gpus", type=int, required=True, help="total GPU count")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GB (e.g. 80)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="tensor parallelism stays within a node [8]")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size when the config leaves it to the tokenizer")
    p.add_argument("--overhead", type=float, default=2.0, help="GB per GPU for CUDA context, NCCL, slack [2]")
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
    fits = plan(cfg, ns.gpus, ns.gpu_mem, ns.gpus_per_node, vocab, ns.overhead)
    if ns.json:
        print(json.dumps({"parameters": counts.total, "config_layout": own.as_dict(),
                          "fits": [e.as_dict() for e in fits[:ns.top]], "num_fits": len(fits)}, indent=1))
        return 0
    m = cfg.model
    print(f"{ns.config}: {counts.total / 1e9:.3f}B parameters ({m.num_layers} layers x "
          f"{counts.per_layer / 1e6:.1f}M, embedding {counts.embedding / 1e6:.1f}M, head {counts.head / 1e6:.1f}M; "
          f"vocab {vocab}{'' if cfg.model.vocab_size else ' (assumed; --vocab)'}), {cfg.precision}, "
          f"seq {m.seq_length}, global batch {cfg.train.global_batch_size}")
    print(f"{ns.gpus} GPUs x {ns.gpu_mem:g} GB ({ns.gpus_per_node} per node); overhead {ns.overhead:g} GB/GPU; "
          f"listing layouts under 90% of memory\n")
    print("the config's own layout:")
    print(HEADER)
    print(_row(own) + ("   fits" if own.total <= 0.9 * ns.gpu_mem * GB else "   DOES NOT FIT"))
    print(f"\n{len(fits)} layouts fit; the best {min(ns.top, len(fits))} by a rough step-time rule "
          "(recompute, TP, pipeline bubble, ZeRO-3, micro batch):")
    if fits:
        print(HEADER)
        for e in fits[:ns.top]:
            print(_row(e))
    else:
        print("  none: add GPUs, use bigger ones, or shorten model.seq_length")
    return 0


if __name__ == "__main__":
    sys.exit(main())
