"""From datasets to batch iterators: resumable sampling per data-parallel rank, objective collation.

Randomness in collation (masking, permutations) is seeded by (train.seed, the
batch's first sample index), so a resumed run draws exactly what the
uninterrupted one would have.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from megalm.config import Config
from megalm.objectives.base import Objective


class _Indexed(torch.utils.data.Dataset):
    """Yields (index, sample) so collation can seed its RNG from the sample index; checks the token ids."""

    def __init__(self, dataset: Any, vocab_size: int):
        from megalm.data.vocab_guard import VocabGuard

        self.dataset, self.guard = dataset, VocabGuard(dataset, vocab_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        self.guard(i, sample)
        return i, sample


class _Collate:
    def __init__(self, objective: Objective, seed: int):
        self.objective, self.seed = objective, seed

    def __call__(self, items: list) -> dict:
        rng = np.random.default_rng([self.seed, int(items[0][0])])
        return self.objective.collate([s for _, s in items], rng)


def _loader(cfg: Config, dataset: Any, objective: Objective, consumed: int, dp_rank: int, dp_size: int,
            vocab_size: int, seed_offset: int = 0) -> Iterator[dict]:
    from megalm.data.sampler import PretrainingSampler

    sampler = PretrainingSampler(total_samples=len(dataset), consumed_samples=consumed,
                                 micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    return iter(torch.utils.data.DataLoader(
        _Indexed(dataset, vocab_size), batch_sampler=sampler, collate_fn=_Collate(objective, cfg.train.seed + seed_offset),
        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
        # starting an iterator draws a seed from this generator; the default one would shift the dropout
        # stream of a resumed run (its RNG state is restored before the iterators are built)
        generator=torch.Generator().manual_seed(cfg.train.seed + seed_offset),
    ))


def open_datasets(cfg: Config, tokenizer: Any, objective: Objective) -> dict:
    """The run's train/valid/test datasets (indices built or mapped): done before the model is built,
    so bad data fails in seconds, not after the model and DeepSpeed are up."""
    from megalm.data.build import build_datasets

    gb = cfg.train.global_batch_size
    evals = max(cfg.train.eval_iters, 1) * gb
    wanted = {"train": cfg.train.iters * gb, "valid": evals, "test": evals if cfg.data.test else 0}
    return build_datasets(cfg, tokenizer, wanted, kind=objective.dataset_kind)


def build_iterators(cfg: Config, tokenizer: Any, objective: Objective, consumed: int, dp_rank: int,
                    dp_size: int, datasets: dict | None = None
                    ) -> tuple[Iterator[dict], Callable[[], Iterator[dict]] | None, Callable[[], Iterator[dict]] | None]:
    """(train batches from ``consumed`` on, factories of fresh validation / test iterators or None).

    Test batches exist only when data.test names test data (Megatron evaluates it once, at the end)."""
    gb = cfg.train.global_batch_size
    if datasets is None:
        datasets = open_datasets(cfg, tokenizer, objective)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    train = _loader(cfg, datasets["train"], objective, consumed, dp_rank, dp_size, vocab)

    def factory(split: str, seed_offset: int) -> Callable[[], Iterator[dict]] | None:
        ds = datasets.get(split)
        if ds is None or len(ds) < gb or cfg.train.eval_iters == 0:
            return None
        # the same batches at every evaluation
        return lambda: _loader(cfg, ds, objective, 0, dp_rank, dp_size, vocab, seed_offset=seed_offset)

    return train, factory("valid", 1), factory("test", 2)
