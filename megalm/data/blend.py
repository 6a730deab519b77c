"""Weighted blends of datasets (``data.prefix: [0.7, a, 0.3, b]``) with Megatron's greedy interleaving.

Sample i goes to the dataset whose share lags its weight most
(``argmax_d w_d*max(i,1) - count_d``, first on ties), so a blend is the same
sequence as Megatron-LM's for the same weights and size, deterministic across
restarts, and cached as two .npy files like every other index.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from megalm.data.cache import cached_arrays
from megalm.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def normalize_weights(weights: Sequence[float]) -> list[float]:
    w = [float(x) for x in weights]
    if not w or any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"blend weights must be non-negative and not all 0, got {list(weights)}")
    total = sum(w)
    return [x / total for x in w]


def build_blending_indices(weights: Sequence[float], size: int, native: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64) for ``size`` samples; weights are normalised first.

    A sequential rule, so a loop: compiled (megalm.data.native) when a C
    compiler is available, else pure Python (~1M samples/s); either way the
    result is cached.
    """
    w = normalize_weights(weights)
    n = len(w)
    if n > np.iinfo(np.int16).max:
        raise ConfigError(f"at most {np.iinfo(np.int16).max} datasets in a blend, got {n}")
    if native and n > 1:
        from megalm.data import native as _native

        out = _native.blend(np.array(w), size)
        if out is not None:
            return out
    return _python_blend(w, size)


def _python_blend(w: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(w)
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    counts = [0] * n
    if n == 1:
        dataset_index[:] = 0
        sample_index[:] = np.arange(size)
        return dataset_index, sample_index
    di: list[int] = [0] * size
    si: list[int] = [0] * size
    rng = range(n)
    for i in range(size):
        s = float(i) if i > 1 else 1.0
        best, best_err = 0, w[0] * s - counts[0]
        for d in rng:
            err = w[d] * s - counts[d]
            if err > best_err:
                best, best_err = d, err
        di[i] = best
        si[i] = counts[best]
        counts[best] += 1
    dataset_index[:] = di
    sample_index[:] = si
    return dataset_index, sample_index


class BlendedDataset:
    """Interleaves ``datasets`` by ``weights`` into ``num_samples`` samples; ``ds[i]`` adds ``dataset_id``."""

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], num_samples: int,
                 cache_dir: Optional[str], split_name: str = "train",
                 descriptions: Optional[Sequence[Any]] = None) -> None:
        if len(datasets) != len(weights):
            raise ConfigError(f"{len(datasets)} datasets but {len(weights)} weights in the blend")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.num_samples = int(num_samples)
        description = {
            "class": "BlendedDataset",
            "datasets": [str(d) for d in (descriptions or [_describe(x) for x in datasets])],
            "weights": self.weights,
            "size": self.num_samples,
            "split": split_name,
        }

        def build() -> dict[str, np.ndarray]:
            a, b = build_blending_indices(self.weights, self.num_samples)
            return {"dataset_index": a, "dataset_sample_index": b}

        arrays = cached_arrays(cache_dir, f"BlendedDataset-{split_name}", description, build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        for d, ds in enumerate(self.datasets):
            need = int(np.count_nonzero(np.asarray(self.dataset_index) == d))
            if need > len(ds):
                raise DataError(f"blend needs {need} samples from dataset {d} ({_describe(ds)}) but it has {len(ds)}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples)")
        d = int(self.dataset_index[i])
        sample = self.datasets[d][int(self.dataset_sample_index[i])]
        sample = dict(sample)
        sample["dataset_id"] = d
        return sample


def _describe(ds: Any) -> str:
    indexed = getattr(ds, "indexed", None)
    prefix = getattr(indexed, "path_prefix", None)
    return f"{type(ds).__name__}({prefix},{getattr(ds, 'split_name', '')},{len(ds)},{getattr(ds, 'cache_key', '')})"
