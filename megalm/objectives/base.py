"""The Objective interface: samples -> model inputs/targets (data-loader side), outputs -> loss.

A new objective is one file with a subclass plus one registry line, or a user
class named as ``objective.name: my_pkg.my_module:MyObjective``.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from megalm.config import Config
from megalm.errors import ConfigError


@dataclass(frozen=True)
class ModelNeeds:
    """What an objective asks of the model: built with these extras, called with these named inputs."""

    inputs: tuple[str, ...] = ("input_ids", "position_ids")  # model(**inputs); also the pipeline's tuple, in order
    query_stream: bool = False  # XLNet's second (query) stream, returned as the logits (PLM)
    binary_head: bool = False  # BERT's SOP/NSP head beside the MLM logits


class Objective(abc.ABC):
    """One pretraining objective.

    ``dataset_kind`` says which samples it reads: ``"gpt"`` (contiguous token
    windows of seq_length+1) or ``"bert_pair"`` (sentence pairs A/B).
    ``collate`` runs in the data loader and must be vectorised over the batch.
    ``needs`` declares the model it trains and the batch keys passed to it by
    name (``inputs``); ``targets`` are the tensors ``loss`` needs besides the output.
    """

    name: ClassVar[str] = ""
    dataset_kind: ClassVar[str] = "gpt"

    def __init__(self, cfg: Config, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """An objective's own ``inputs`` must give names: one written for positional inputs fails here, clearly."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("inputs")
        if own is None:
            return

        @functools.wraps(own)
        def inputs(self, batch):
            out = own(self, batch)
            if not isinstance(out, Mapping):
                raise ConfigError(f"{cls.__module__}.{cls.__qualname__}.inputs returned a {type(out).__name__}; "
                                  "it must return a dict of the model's named inputs (model(**inputs)), or be "
                                  "removed in favour of declaring them in needs(cfg).inputs")
            return out

        cls.inputs = inputs

    @classmethod
    def needs(cls, cfg: Config) -> ModelNeeds:  # noqa: ARG003 - subclasses read cfg; the default does not
        """The model this objective trains under ``cfg`` (a classmethod: the model is built before any data)."""
        return ModelNeeds()

    @abc.abstractmethod
    def collate(self, samples: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Stack a micro-batch of dataset samples into tensors (masking etc. happens here)."""

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's keyword arguments: ``model(**objective.inputs(batch))``."""
        return {n: batch[n] for n in self.needs(self.cfg).inputs}

    def pipeline_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The same tensors as the first pipeline stage's input tuple (DeepSpeed passes tensors, not names)."""
        return tuple(self.inputs(batch).values())

    @abc.abstractmethod
    def targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """What ``loss`` needs besides the model output."""

    @abc.abstractmethod
    def loss(self, output: Any, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A scalar fp32 loss for this micro-batch (mean over its counted tokens)."""

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens processed (for tokens/s)."""
        return int(batch["input_ids"].numel())

    def metrics(self, output: Any, targets: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:  # noqa: ARG002 - a hook
        """Extra per-micro-batch numbers worth logging beside the loss (e.g. MLM and SOP parts), as 0-d tensors
        left on the device: the step averages them with the loss in one all-reduce (floats would sync each)."""
        return {}
