"""Megatron-LM flags and GPT-NeoX config keys -> megalm config keys: one mapping, from which
docs/migrating.md's table is generated (tests/test_migrate.py checks every key against megalm.config).

    python -m megalm.migrate --write docs/migrating.md
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple, Optional


class Flag(NamedTuple):
    megatron: str  # Megatron-LM command-line flag ("" = none)
    neox: str  # GPT-NeoX YAML key ("" = none)
    megalm: str  # megalm config key
    note: str = ""  # how the value translates, when not one to one


FLAGS = [
    Flag("--num-layers", "num_layers", "model.num_layers"),
    Flag("--hidden-size", "hidden_size", "model.hidden_size"),
    Flag("--num-attention-heads", "num_attention_heads", "model.num_heads"),
    Flag("--num-query-groups", "num_kv_heads", "model.num_kv_heads", "with `--group-query-attention`"),
    Flag("--ffn-hidden-size", "intermediate_size", "model.ffn_hidden_size"),
    Flag("--seq-length", "seq_length", "model.seq_length"),
    Flag("--max-position-embeddings", "max_position_embeddings", "model.max_position_embeddings"),
    Flag("--make-vocab-size-divisible-by", "make_vocab_size_divisible_by", "model.make_vocab_size_divisible_by"),
    Flag("--position-embedding-type", "pos_emb", "model.position",
         "`learned_absolute`/`learned` → `learned`, `rope`/`rotary` → `rope`, `sinusoidal` → `sinusoidal`"),
    Flag("--rotary-base", "rotary_emb_base", "model.rope_base"),
    Flag("--use-rope-scaling", "", "model.rope_scaling", "Llama-3.1 scaling: `{type: llama3, factor: 8, ...}`"),
    Flag("--normalization", "norm", "model.norm", "`LayerNorm` → `layernorm`, `RMSNorm` → `rmsnorm`"),
    Flag("--norm-epsilon", "layernorm_epsilon", "model.norm_eps", "NeoX: `rms_norm_epsilon` with RMSNorm"),
    Flag("--swiglu", "activation", "model.activation", "`--swiglu` → `swiglu`, else `gelu`"),
    Flag("--disable-bias-linear", "use_bias_in_attn_linear", "model.bias", "the flag → `false`"),
    Flag("--untie-embeddings-and-output-weights", "no_weight_tying", "model.tie_embeddings", "the flag → `false`"),
    Flag("--hidden-dropout", "hidden_dropout", "model.hidden_dropout"),
    Flag("--attention-dropout", "attention_dropout", "model.attention_dropout"),
    Flag("--init-method-std", "init_method_std", "model.init_std"),
    Flag("--vocab-size", "", "model.vocab_size", "default: the tokenizer's"),
    Flag("--tensor-model-parallel-size", "model_parallel_size", "parallel.tensor"),
    Flag("--pipeline-model-parallel-size", "pipe_parallel_size", "parallel.pipeline"),
    Flag("--sequence-parallel", "sequence_parallel", "parallel.sequence_parallel"),
    Flag("--use-distributed-optimizer", "zero_optimization.stage", "zero.stage",
         "Megatron's distributed optimizer ≈ `zero.stage: 1`"),
    Flag("--bf16", "bf16.enabled", "precision", "`bf16`"),
    Flag("--fp16", "fp16.enabled", "precision", "`fp16` (CUDA only)"),
    Flag("--initial-loss-scale", "fp16.initial_scale_power", "loss_scale.initial_scale_power",
         "Megatron gives the scale, megalm its log2"),
    Flag("--loss-scale-window", "fp16.loss_scale_window", "loss_scale.loss_scale_window"),
    Flag("--hysteresis", "fp16.hysteresis", "loss_scale.hysteresis"),
    Flag("--min-loss-scale", "fp16.min_loss_scale", "loss_scale.min_loss_scale"),
    Flag("--micro-batch-size", "train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    Flag("--global-batch-size", "train_batch_size", "train.global_batch_size"),
    Flag("--train-iters", "train_iters", "train.iters"),
    Flag("--seed", "seed", "train.seed"),
    Flag("--log-interval", "log_interval", "train.log_interval"),
    Flag("--eval-interval", "eval_interval", "train.eval_interval"),
    Flag("--eval-iters", "eval_iters", "train.eval_iters"),
    Flag("--recompute-granularity", "checkpoint_activations", "train.activation_checkpointing",
         "`full`/`selective`; NeoX `checkpoint_activations: true` → `full`"),
    Flag("--exit-duration-in-mins", "", "train.exit_duration_minutes", "exits 75 (requeue) instead of 0"),
    Flag("--exit-interval", "", "train.exit_interval"),
    Flag("--lr", "optimizer.params.lr", "optim.lr"),
    Flag("--min-lr", "min_lr", "optim.min_lr"),
    Flag("--weight-decay", "weight_decay", "optim.weight_decay"),
    Flag("--adam-beta1", "optimizer.params.betas[0]", "optim.beta1"),
    Flag("--adam-beta2", "optimizer.params.betas[1]", "optim.beta2"),
    Flag("--adam-eps", "optimizer.params.eps", "optim.eps"),
    Flag("--clip-grad", "gradient_clipping", "optim.clip_grad"),
    Flag("--lr-decay-style", "lr_decay_style", "optim.schedule",
         "`constant`, `linear`, `cosine`, `inverse-square-root` → `inverse_sqrt`, `WSD` → `wsd`"),
    Flag("--lr-warmup-iters", "warmup", "optim.warmup_iters", "NeoX `warmup` is a fraction: × `train_iters`"),
    Flag("--lr-decay-iters", "lr_decay_iters", "optim.decay_iters"),
    Flag("--data-path", "data_path", "data.prefix",
         "one prefix or `[w1, p1, w2, p2]`; NeoX `train_data_paths` + `train_data_weights` interleaved"),
    Flag("--split", "split", "data.split"),
    Flag("--data-cache-path", "", "data.cache_dir"),
    Flag("--num-workers", "num_workers", "data.num_workers"),
    Flag("--tokenizer-model", "vocab_file", "data.tokenizer", "a SentencePiece `.model`"),
    Flag("--save / --load", "save / load", "checkpoint.dir", "one directory; resume with `checkpoint.resume: auto`"),
    Flag("--save-interval", "checkpoint_factor", "checkpoint.interval"),
    Flag("--reset-position-ids", "", "objective.reset_position_ids"),
    Flag("--reset-attention-mask", "", "objective.reset_attention_mask"),
    Flag("--eod-mask-loss", "", "objective.eod_mask_loss"),
    Flag("--mask-prob", "", "objective.mask_prob", "BERT"),
    Flag("--bert-no-binary-head", "", "objective.binary_head", "the flag → `none`"),
    Flag("--tensorboard-dir", "tensorboard_dir", "run.tensorboard", "written under `run.dir/tensorboard`"),
    Flag("--wandb-project", "wandb_project", "run.wandb.project"),
    Flag("--wandb-exp-name", "", "run.wandb.name"),
]

START, END = "<!-- flag-map:start -->", "<!-- flag-map:end -->"


def table() -> str:
    rows = ["| Megatron-LM | GPT-NeoX | megalm | note |", "|---|---|---|---|"]
    for f in FLAGS:
        cells = [f"`{f.megatron}`" if f.megatron else "", f"`{f.neox}`" if f.neox else "", f"`{f.megalm}`",
                 f.note.replace("|", "\\|")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def replace_table(text: str) -> str:
    from megalm.markers import replace_between

    return replace_between(text, START, END, table())


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megalm.migrate", description=__doc__)
    p.add_argument("--write", metavar="FILE", help="replace the table between the flag-map markers in FILE")
    ns = p.parse_args(argv)
    if not ns.write:
        print(table())
        return 0
    with open(ns.write) as f:
        text = replace_table(f.read())
    with open(ns.write, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
