"""Train/valid/test splits in Megatron's syntax: "969,30,1" -> index ranges of a dataset.

GPT datasets split by sequence, BERT-pair datasets by document; both use the
same rounding as Megatron-LM so a split selects the same items there and here.
"""

from __future__ import annotations

import re
from typing import Optional

from megalm.errors import ConfigError

SPLITS = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """"969,30,1" -> [0.969, 0.030, 0.001]; missing parts are 0; weights need not sum to anything."""
    parts = [float(x) for x in re.findall(r"[.0-9]+", str(split))]
    if not parts or len(parts) > 3:
        raise ConfigError(f"data.split must be 1-3 comma-separated non-negative numbers like '969,30,1', got {split!r}")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    if total <= 0:
        raise ConfigError(f"data.split {split!r} sums to 0; at least one part must be positive")
    return [p / total for p in parts]


def split_ranges(split: str, num_items: int) -> dict[str, Optional[tuple[int, int]]]:
    """Each split's ``[begin, end)`` over ``num_items``, or None where the split's weight is 0."""
    weights = parse_split(split)
    out: dict[str, Optional[tuple[int, int]]] = {}
    acc = 0.0
    for name, w in zip(SPLITS, weights):
        lo, hi = acc, acc + w
        acc = hi
        if w <= 0:
            out[name] = None
            continue
        out[name] = (int(round(lo * float(num_items))), int(round(hi * float(num_items))))
    return out
