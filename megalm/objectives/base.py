"""The Objective interface: samples -> model inputs/targets (data-loader side), outputs -> loss.

A new objective is one file with a subclass plus one registry line, or a user
class named as ``objective.name: my_pkg.my_module:MyObjective``.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import torch

from megalm.config import Config


class Objective(abc.ABC):
    """One pretraining objective.

    ``dataset_kind`` says which samples it reads: ``"gpt"`` (contiguous token
    windows of seq_length+1) or ``"bert_pair"`` (sentence pairs A/B).
    ``collate`` runs in the data loader and must be vectorised over the batch.
    ``inputs`` are the positional tensors the model (or the first pipeline
    stage) takes; ``targets`` the tensors ``loss`` needs besides the output.
    """

    name: ClassVar[str] = ""
    dataset_kind: ClassVar[str] = "gpt"

    def __init__(self, cfg: Config, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer

    @abc.abstractmethod
    def collate(self, samples: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Stack a micro-batch of dataset samples into tensors (masking etc. happens here)."""

    @abc.abstractmethod
    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Positional arguments of the model's forward."""

    @abc.abstractmethod
    def targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """What ``loss`` needs besides the model output."""

    @abc.abstractmethod
    def loss(self, output: Any, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A scalar fp32 loss for this micro-batch (mean over its counted tokens)."""

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens processed (for tokens/s)."""
        return int(batch["input_ids"].numel())

    def metrics(self, output: Any, targets: tuple[torch.Tensor, ...]) -> dict[str, float]:
        """Extra per-micro-batch numbers worth logging beside the loss (e.g. MLM and SOP parts)."""
        return {}

    def model_kwargs(self) -> dict:
        """Extra keyword arguments build_model needs for this objective (e.g. a query stream)."""
        return {}
