"""Causal self-attention through SDPA, skipping the work torch's CPU kernel does above the diagonal at s <= 512.

torch's CPU flash-attention kernel (2.13) tiles keys in blocks of 512 and, under
``is_causal``, skips only whole key blocks above the diagonal, so for s <= 512
it computes and masks the full s x s square. Splitting the queries in two
halves (the first attends causally to the first half of the keys, the second to
all keys through a [s/2, s] boolean mask) leaves out the upper-right quarter:
forward + backward 1.12-1.20x faster at s = 448-512, bf16, measured with
``benchmarks/cpu_causal_attention.py``; slower below 384 (two calls' overhead),
no gain above 512 (the kernel skips blocks itself). The values are the same
attention, rounded differently (tests compare within 1e-6 fp32). CUDA, attention
dropout (one RNG draw per call) and every other length take one ``is_causal`` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPLIT_LENGTHS = (384, 512)  # CPU sequence lengths (inclusive) where two half-calls beat one; re-measure on upgrade


def splits_on_cpu(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    s = q.size(2)
    return (q.device.type == "cpu" and dropout_p == 0.0 and k.size(2) == s
            and SPLIT_LENGTHS[0] <= s <= SPLIT_LENGTHS[1])


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     gqa: bool = False) -> torch.Tensor:
    """[b, h, s, d] causal attention (query i sees keys 0..i), as ``scaled_dot_product_attention(is_causal=True)``."""
    if not splits_on_cpu(q, k, dropout_p):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    return split_causal_attention(q, k, v, gqa)


def split_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool = False) -> torch.Tensor:
    """The two half-calls, at any length (``causal_attention`` picks where; the benchmark times them anywhere)."""
    s = q.size(2)
    half = s // 2
    first = F.scaled_dot_product_attention(q[:, :, :half], k[:, :, :half], v[:, :, :half], is_causal=True,
                                           enable_gqa=gqa)
    below = torch.ones(s - half, s, dtype=torch.bool, device=q.device).tril(half)  # row j: keys 0 .. half + j
    second = F.scaled_dot_product_attention(q[:, :, half:], k, v, attn_mask=below, enable_gqa=gqa)
    return torch.cat((first, second), dim=2)
