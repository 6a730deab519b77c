"""``build_datasets``: from a Config to train/valid/test datasets (single prefix or a weighted blend).

The one entry the training loop calls; it reads cfg.data (prefix + split, or
separate train/valid/test paths, cache_dir), cfg.model.seq_length and
cfg.train.seed, and returns None for a split that has no data or no
requested samples.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

from megalm.data.blend import BlendedDataset, normalize_weights
from megalm.data.indexed import IndexedDataset, dataset_exists
from megalm.data.split import SPLITS, split_ranges
from megalm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Megatron's default surplus: each blended component is asked for 0.5% more samples than its share.
BLEND_SURPLUS = 0.005


def parse_blend(prefix: Any, key: str = "data.prefix") -> list[tuple[float, str]]:
    """``"p"`` -> [(1, p)]; ``[w1, p1, w2, p2]`` -> pairs; ``[p1, p2]`` -> equal weights."""
    if prefix is None or prefix == "" or prefix == []:
        raise ConfigError(f"{key} is not set: give a dataset prefix (path without .bin/.idx) "
                          "or a blend [w1, prefix1, w2, prefix2]")
    if isinstance(prefix, str):
        return [(1.0, prefix)]
    items = list(prefix)
    if all(isinstance(x, str) for x in items):
        return [(1.0, x) for x in items]
    if len(items) % 2:
        raise ConfigError(f"{key} blend must alternate weight, prefix: [w1, p1, w2, p2, ...]; got {items}")
    pairs = []
    for w, p in zip(items[0::2], items[1::2]):
        if isinstance(w, str):
            try:
                w = float(w)
            except ValueError:
                raise ConfigError(f"{key} blend: expected a weight before {p!r}, got {w!r}") from None
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not isinstance(p, str):
            raise ConfigError(f"{key} blend must alternate weight, prefix; got {w!r}, {p!r}")
        pairs.append((float(w), p))
    normalize_weights([w for w, _ in pairs])
    return pairs


def default_cache_dir(cfg: Any, first_prefix: str) -> str:
    return cfg.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(first_prefix)), "cache")


def _open(prefix: str, key: str = "data.prefix") -> IndexedDataset:
    if not dataset_exists(prefix):
        raise DataError(f"dataset {prefix}.bin/.idx not found ({key}); create it with `megalm preprocess`")
    return IndexedDataset(prefix)


def split_sources(cfg: Any) -> dict[str, Optional[tuple[str, list[tuple[float, str]], str]]]:
    """split -> (config key, blend pairs, split string) or None: data.train/valid/test when any is set
    (each used whole), else data.prefix cut by data.split."""
    d = cfg.data
    separate = {s: getattr(d, s, None) for s in SPLITS}
    if not any(v not in (None, "", []) for v in separate.values()):
        pairs = parse_blend(d.prefix)
        return {s: ("data.prefix", pairs, d.split) for s in SPLITS}
    if d.prefix not in (None, "", []):
        raise ConfigError("data.prefix and data.train/data.valid/data.test are alternatives: set data.prefix "
                          "(cut by data.split) or separate data.train (+ data.valid, data.test), not both")
    if separate["train"] in (None, "", []):
        raise ConfigError("data.valid/data.test are set but data.train is not: give the training data as "
                          "data.train (a prefix or a blend)")
    return {s: (None if v in (None, "", []) else (f"data.{s}", parse_blend(v, f"data.{s}"), "1"))
            for s, v in separate.items()}


def _one(kind: str, cfg: Any, tokenizer: Any, indexed: IndexedDataset, split: str, rng_range: tuple[int, int],
         num_samples: int, cache_dir: str) -> Any:
    tok_name = f"{os.path.basename(getattr(tokenizer, 'model_path', '') or '')}:{getattr(tokenizer, 'vocab_size', None)}"
    if kind == "gpt":
        from megalm.data.gpt_dataset import GPTDataset

        return GPTDataset(indexed, split, rng_range, num_samples, cfg.model.seq_length, cfg.train.seed,
                          os.path.join(cache_dir, "GPTDataset_indices"), eod_id=tokenizer.eod,
                          pad_id=tokenizer.pad, tokenizer_name=tok_name)
    if kind == "bert_pair":
        from megalm.data.bert_dataset import BertPairDataset

        return BertPairDataset(indexed, split, rng_range, num_samples, cfg.model.seq_length, cfg.train.seed,
                               os.path.join(cache_dir, "BertPairDataset_indices"), tokenizer,
                               binary_head=cfg.objective.binary_head)
    raise ConfigError(f"unknown dataset kind {kind!r}; expected 'gpt' or 'bert_pair'")


def build_datasets(cfg: Any, tokenizer: Any, num_samples: dict, kind: str = "gpt") -> dict[str, Optional[Any]]:
    """``{"train": ds, "valid": ds, "test": ds}`` (None where the split is empty or 0 samples are asked).

    Call on every rank: when torch.distributed is initialised, rank 0 builds
    the index caches and the others wait and memory-map them.
    """
    sources = split_sources(cfg)
    cache_dir = default_cache_dir(cfg, sources["train"][1][0][1])
    opened: dict[str, IndexedDataset] = {}
    for src in sources.values():
        for _, p in (src[1] if src else ()):
            if p not in opened:
                opened[p] = _open(p, src[0])
    out: dict[str, Optional[Any]] = {}
    for split in SPLITS:
        want = int(num_samples.get(split) or 0)
        if want <= 0 or sources[split] is None:
            out[split] = None
            continue
        key, pairs, split_string = sources[split]
        parts = []
        for w, p in pairs:
            ind = opened[p]
            # GPT splits by sequence, BERT pairs by document (as Megatron does)
            n = len(ind) if kind == "gpt" else ind.num_documents
            rng = split_ranges(split_string, n)["train" if key != "data.prefix" else split]
            if rng is None or rng[1] <= rng[0]:
                if key != "data.prefix":
                    raise DataError(f"{key}: dataset {p} is empty; it cannot serve as {split} data")
                parts = None
                break
            parts.append((w, p, ind, rng))
        if parts is None:
            out[split] = None
            log.info("split %s is empty under data.split=%s", split, cfg.data.split)
            continue
        if len(parts) == 1:
            _, _, ind, rng = parts[0]
            out[split] = _one(kind, cfg, tokenizer, ind, split, rng, want, cache_dir)
            continue
        weights = normalize_weights([w for w, *_ in parts])
        members = [
            _one(kind, cfg, tokenizer, ind, split, rng,
                 int(math.ceil(math.ceil(want * wn) * (1 + BLEND_SURPLUS))), cache_dir)
            for wn, (_, _, ind, rng) in zip(weights, parts)
        ]
        out[split] = BlendedDataset(members, weights, want, os.path.join(cache_dir, "BlendedDataset_indices"),
                                    split_name=split)
    return out
