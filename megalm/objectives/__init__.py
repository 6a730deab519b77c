"""Objective registry: ``objective.name`` -> an Objective class (built-in name or ``module:Class``)."""

from __future__ import annotations

import importlib
from typing import Any

from megalm.config import Config
from megalm.errors import ConfigError
from megalm.objectives.base import Objective

BUILTIN = {
    "clm": "megalm.objectives.clm:CausalLM",
    "mlm": "megalm.objectives.mlm:MaskedLM",
    "plm": "megalm.objectives.plm:PermutationLM",
}


def objective_class(name: str) -> type:
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ConfigError(
            f"objective.name '{name}' is neither a built-in ({', '.join(BUILTIN)}) nor 'package.module:Class'"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"objective.name '{name}': cannot import module '{module_name}': {e}") from None
    cls = getattr(module, class_name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ConfigError(f"objective.name '{name}': '{class_name}' in {module_name} is not an Objective subclass")
    return cls


def build_objective(cfg: Config, tokenizer: Any) -> Objective:
    return objective_class(cfg.objective.name)(cfg, tokenizer)


__all__ = ["Objective", "objective_class", "build_objective", "BUILTIN"]
