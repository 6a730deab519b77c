"""Position information: learned absolute, sinusoidal (Vaswani), rotary (RoPE, rotate-half layout) and ALiBi.

RoPE follows the GPT-NeoX / HF Llama layout (first half, second half of each
head), so converted weights need no permutation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megalm.parallel.compiled_ops import fusable


def sinusoidal_table(positions: int, dim: int) -> torch.Tensor:
    pos = torch.arange(positions, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(positions, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's long-context RoPE: frequencies whose wavelength exceeds the original context / low_freq_factor
    are divided by ``factor``, those shorter than context / high_freq_factor kept, and the band between
    interpolated linearly in (context / wavelength)."""
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: long waves, 1: short waves
    return inv_freq / factor * (1 - blend) + inv_freq * blend


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype,
                 scaling: Optional[dict] = None) -> tuple:
    """cos, sin of shape [b, 1, s, head_dim] for ``apply_rope`` (fp32 angles, cast to ``dtype``);
    ``scaling`` is model.rope_scaling (Llama-3 style) or None."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    freqs = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.): 2^(-8/n)^(1..n) for n heads a power of two; otherwise those of the
    largest power of two below, then every other slope of twice that (as BLOOM does)."""
    closest = 2 ** math.floor(math.log2(heads))
    slopes = 2.0 ** (-8.0 / closest * torch.arange(1, closest + 1, dtype=torch.float64))
    extra = 2.0 ** (-4.0 / closest * (1 + 2 * torch.arange(heads - closest, dtype=torch.float64)))
    return torch.cat([slopes, extra]).float()


def alibi_bias(q_pos: torch.Tensor, k_pos: torch.Tensor, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[b, heads, sq, sk] score bias -slope x |query position - key position| (causal rows: BLOOM's slope x key
    position up to a per-row constant, which softmax ignores; bidirectional rows: symmetric distance)."""
    dist = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).abs().float()
    return (-slopes.to(q_pos.device)[None, :, None, None] * dist).to(dtype)


@fusable
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, d]."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
