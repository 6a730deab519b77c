"""``megalm generate``: text from a GPT checkpoint, with a KV cache, on 1 rank or TP ranks under torchrun.

Loads the layout-independent weights (any training layout), builds the model at
TP = world size, and decodes with an incremental forward over the model's own
modules (so TP comms are the layers' own). Every rank samples from the same
gathered logits with the same generator; rank 0's token is broadcast anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from megalm import environment
from megalm.config import Config, ParallelConfig
from megalm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """greedy, or temperature / top-k / top-p sampling (top_k=0 and top_p=1.0 mean off)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def for_inference(cfg: Config, tensor: int) -> Config:
    """``cfg`` at TP=``tensor``, PP=1, no sequence parallelism or recomputation."""
    return cfg.replace(parallel=ParallelConfig(tensor=tensor, pipeline=1),
                       train=dataclasses.replace(cfg.train, activation_checkpointing="none"))


def repad(weights: dict, vocab_size: int, cfg: Config) -> dict:
    """Full weights with their vocabulary rows re-padded for ``cfg``'s TP degree (padding is layout-dependent)."""
    from megalm.build import padded_vocab_size

    padded = padded_vocab_size(vocab_size, cfg)
    out = {}
    for name, t in weights.items():
        if name in ("embedding.word.weight", "head.weight", "embedding.lm_bias"):
            t = t[:vocab_size]
            t = torch.cat([t, t.new_zeros((padded - vocab_size,) + tuple(t.shape[1:]))])
        out[name] = t
    return out


def load_model(checkpoint: str, step: Optional[int] = None, tensor: int = 1,
               device: Optional[torch.device] = None) -> tuple:
    """(model shard for this TP rank in eval mode, inference cfg, vocab size, tokenizer path or None)."""
    from megalm.hf.export import tokenizer_path
    from megalm.build import build_model
    from megalm.tp_shard_rules import shard_state_dict
    from megalm.parallel import state
    from megalm.training.checkpoint.paths import resolve_step_dir
    from megalm.training.checkpoint.read_shards import read_full_weights

    step_dir = resolve_step_dir(checkpoint, step)
    cfg, vocab, weights = read_full_weights(step_dir)
    if cfg.model.arch != "gpt":
        raise ConfigError(f"generate needs a decoder (model.arch=gpt); {step_dir} holds model.arch={cfg.model.arch}")
    cfg = for_inference(cfg, tensor)
    weights = repad(weights, vocab, cfg)
    if tensor > 1 and not state.is_initialized():
        state.initialize(tensor, 1)
    model = build_model(cfg, vocab)
    shard = shard_state_dict(weights, cfg, vocab, state.tensor_rank() if tensor > 1 else 0, tensor)
    model.load_state_dict(shard)
    if device is not None:
        model = model.to(device)
    return model.eval(), cfg, vocab, tokenizer_path(step_dir, cfg)


# ---------------------------------------------------------------- incremental forward

@torch.no_grad()
def forward_step(model, ids: torch.Tensor, start: int, cache: list) -> torch.Tensor:
    """Full-vocabulary logits [b, V] of the last of ``ids`` (positions start ..), through the model's own blocks.

    ``cache`` holds one (keys, values) entry per block (None before the first step) and is extended in place.
    """
    from megalm.model.attention import KVCache
    from megalm.model.context import contexts
    from megalm.parallel import state

    b, n = ids.shape
    pos = torch.arange(start, start + n, device=ids.device).unsqueeze(0).expand(b, n)
    h = model.embedding(ids, pos)
    ctx, _ = contexts(model.m, b, n, ids.device, h.dtype, {"position_ids": pos}, past=start)
    for i, block in enumerate(model.layers):
        kv = KVCache(cache[i])
        h = block(h, ctx, cache=kv)
        cache[i] = kv.kv
    logits = model.logits(h[:, -1:])[:, 0]
    if state.tensor_size() > 1:
        from megalm.parallel.mappings import gather_from_tensor_region

        logits = gather_from_tensor_region(logits)
    return logits[:, :model.vocab_size].float()


def pick(logits: torch.Tensor, s: Sampling, gen: Optional[torch.Generator]) -> torch.Tensor:
    """Next token ids [b] from logits [b, V]."""
    if s.greedy or s.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > s.top_p  # keep the smallest prefix reaching top_p (first always kept)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=gen)[:, 0]


@torch.no_grad()
def generate(model, prompt_ids: list, max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_id: Optional[int] = None) -> list:
    """Prompt + new token ids (stops early after ``eos_id``); the prompt plus output must fit max_positions."""
    from megalm.parallel import state

    m = model.m
    if not prompt_ids:
        raise ConfigError("generate needs a non-empty prompt (give --prompt text, or a bos token)")
    limit = m.max_positions if m.position == "learned" else None
    if limit is not None and len(prompt_ids) + max_new_tokens > limit:
        raise ConfigError(f"prompt ({len(prompt_ids)}) + --max-new-tokens ({max_new_tokens}) exceeds "
                          f"model.max_position_embeddings={limit} of this learned-position model")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(sampling.seed)  # sampling runs on the CPU: same draws on any device
    cache: list = [None] * len(model.layers)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = list(prompt_ids)
    start = 0
    for _ in range(max_new_tokens):
        logits = forward_step(model, ids, start, cache).cpu()
        nxt = pick(logits, sampling, gen).to(device)
        if state.tensor_size() > 1:
            from megalm.parallel import comm

            comm.broadcast_(nxt, src=state.tensor_ranks()[0], group=state.tensor_group())
        start += ids.size(1)
        token = int(nxt[0])
        out.append(token)
        if eos_id is not None and token == eos_id:
            break
        ids = nxt.view(1, 1)
    return out


# ---------------------------------------------------------------- CLI

def _init_distributed() -> int:
    """World size under torchrun (process group started), else 1."""
    world = environment.world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(environment.local_rank())
    if world > 1:
        import torch.distributed as dist

        from megalm.distributed import backend_for_device

        if not dist.is_initialized():
            dist.init_process_group(backend_for_device())
    return world


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (follows 'latest') or a step dir")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default unless sampling options given)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bos", action="store_true", help="prepend the tokenizer's bos token to the prompt")
    p.add_argument("--no-stop", action="store_true", help="do not stop at eos")
    p.add_argument("--json", action="store_true", help='one line {"prompt_ids", "output_ids", "text"}')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sampling_given = args.temperature is not None or args.top_k > 0 or args.top_p < 1.0
    if args.greedy and sampling_given:
        raise ConfigError("--greedy cannot be combined with --temperature / --top-k / --top-p")
    if not 0.0 < args.top_p <= 1.0:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    sampling = Sampling(greedy=not sampling_given, temperature=1.0 if args.temperature is None else args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    world = _init_distributed()
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        model, cfg, vocab, tok_path = load_model(args.checkpoint, args.step, tensor=world, device=device)
        if tok_path is None:
            raise ConfigError(f"{args.checkpoint} carries no tokenizer and data.tokenizer is unset")
        from megalm.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_path)
        prompt_ids = ([tok.bos] if args.bos and tok.bos is not None else []) + tok.encode(args.prompt)
        out = generate(model, prompt_ids, args.max_new_tokens, sampling, None if args.no_stop else tok.eos)
        new = out[len(prompt_ids):]
        text = tok.decode([t for t in new if t != tok.eos])
        rank = environment.rank()
        if rank == 0:
            if args.json:
                print(json.dumps({"prompt_ids": prompt_ids, "output_ids": new, "text": text}, ensure_ascii=False))
            else:
                print(args.prompt + text)
            sys.stdout.flush()
    finally:
        if world > 1:
            import torch.distributed as dist

            from megalm.parallel import comm

            comm.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from megalm.distributed import exit_without_teardown

    exit_without_teardown(main())
