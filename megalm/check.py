"""``megalm check``: everything knowable before a GPU is touched, in seconds, on the login node.

Config rules (megalm.config), files present and readable (datasets, tokenizer, resume path), the
tokenizer's vocabulary against ``model.vocab_size``, writable cache/run directories, the layout on
``--world-size`` ranks, and the planner's memory verdict. ``megalm/pretrain.py`` runs the same
checks (``preflight``) before it builds a model.

    megalm check configs/gpt_1b.yaml --world-size 64 --gpu-mem 80 --set data.prefix=/data/pile_text_document
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

from megalm import config as C
from megalm import environment
from megalm.errors import ConfigError, DataError, MegalmError

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What each check found: ``(rule, message)`` per error, warning and passed check."""

    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    passed: list = field(default_factory=list)
    vocab_size: Optional[int] = None  # the tokenizer's, once read

    def run(self, rule: str, fn: Callable[[], Optional[str]]) -> None:
        try:
            note = fn()
        except MegalmError as e:
            self.errors.append((rule, str(e)))
        else:
            self.passed.append((rule, note or "ok"))

    @property
    def ok(self) -> bool:
        return not self.errors


def data_prefixes(cfg: C.Config) -> list[tuple[str, str]]:
    """Every dataset prefix the run will open, as ``(config key, prefix)``: the one place that resolves
    ``data.*`` into files, so a new data key is one more line here."""
    from megalm.data.build import split_sources

    seen, out = set(), []
    for source in split_sources(cfg).values():  # data.prefix (cut by data.split) or data.train/valid/test
        if source is None:
            continue
        key, pairs, _ = source
        for _, prefix in pairs:
            if (key, prefix) not in seen:
                seen.add((key, prefix))
                out.append((key, prefix))
    return out


def _open_dataset(key: str, prefix: str, deep: bool = True) -> str:
    from megalm.data.indexed import IndexedDataset, data_file, index_file

    for path in (data_file(prefix), index_file(prefix)):
        if not os.path.isfile(path):
            raise DataError(f"{key}: {path} not found; point {key} at a .bin/.idx prefix (without the extension) "
                            "or create it with `megalm preprocess`")
        if not os.access(path, os.R_OK):
            raise DataError(f"{key}: {path} is not readable by this user; fix its permissions")
    if not deep:
        return f"{prefix}: .bin and .idx readable"
    ds = IndexedDataset(prefix)  # reads and checks the whole index (sizes, pointers, .bin length)
    if len(ds) == 0:
        raise DataError(f"{key}: {prefix} holds no sequences; re-run `megalm preprocess` on a non-empty input")
    return f"{prefix}: {len(ds)} sequences, {ds.num_documents} documents"


def _tokenizer(cfg: C.Config, report: Report) -> str:
    from megalm.data.tokenizer import load_tokenizer

    path = cfg.data.tokenizer
    if not path:
        raise ConfigError("data.tokenizer is not set: --set data.tokenizer=PATH (a SentencePiece .model, a "
                          "Hugging Face tokenizer.json or its directory, or a GPT-2 vocab.json)")
    if not os.path.exists(path):
        raise DataError(f"data.tokenizer: {path} not found; --set data.tokenizer=PATH "
                        "(train one with `megalm train-tokenizer`)")
    tok = load_tokenizer(path)
    report.vocab_size = tok.vocab_size
    v = cfg.model.vocab_size
    if v is not None and v < tok.vocab_size:
        raise ConfigError(f"model.vocab_size ({v}) is smaller than the tokenizer's vocabulary ({tok.vocab_size}, "
                          f"{path}): ids >= {v} would index past the embedding; --set model.vocab_size="
                          f"{tok.vocab_size} (or null to take the tokenizer's)")
    if cfg.objective.name == "mlm" and tok.mask is None:
        raise DataError(f"objective.name=mlm needs a <mask> piece, which {path} lacks; train a tokenizer with "
                        "`megalm train-tokenizer` (it reserves <mask>, <cls>, <sep>)")
    return f"{path}: {tok.vocab_size} pieces" + (f", model.vocab_size {v}" if v else "")


def _writable(key: str, path: str) -> str:
    """The directory, or its nearest existing parent, must be writable (nothing is created here)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{key}: {probe} is a file, not a directory; point {key} elsewhere")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path} cannot be created or written ({probe} is not writable by this user); "
                          f"--set {key}=A_WRITABLE_DIR")
    return f"{path} writable" + ("" if probe == os.path.abspath(path) else f" (will be created under {probe})")


def _cache_dir(cfg: C.Config) -> str:
    from megalm.data.build import default_cache_dir

    first = data_prefixes(cfg)[0][1]
    return _writable("data.cache_dir", default_cache_dir(cfg, first))


def _resume(cfg: C.Config) -> str:
    how = cfg.checkpoint.resume
    if how in ("auto", "none"):
        return f"checkpoint.resume={how}"
    if not os.path.isdir(how):
        raise ConfigError(f"checkpoint.resume: {how} is not a directory; give a checkpoint step directory, "
                          "or --set checkpoint.resume=auto (latest in checkpoint.dir) / none")
    if not os.access(how, os.R_OK | os.X_OK):
        raise ConfigError(f"checkpoint.resume: {how} is not readable by this user")
    return f"resume from {how}"


def _memory(cfg: C.Config, world: int, gpu_mem_gb: Optional[float], vocab: Optional[int]) -> str:
    from megalm import plan

    est = plan.estimate(cfg, plan.config_layout(cfg, world), vocab or cfg.model.vocab_size or 32000,
                        overhead_gb=plan.OVERHEAD_GB)
    total = est.total / plan.GB
    if gpu_mem_gb is None:
        return f"estimated {total:.2f} GB per rank (give --gpu-mem GB for a verdict)"
    margin = gpu_mem_gb - total
    if total > plan.HEADROOM * gpu_mem_gb:
        raise ConfigError(
            f"memory: the layout needs an estimated {total:.1f} GB per GPU, over {plan.HEADROOM:.0%} of "
            f"--gpu-mem {gpu_mem_gb:g} GB; raise zero.stage, parallel.tensor / parallel.pipeline, set "
            "train.activation_checkpointing=selective or full, or lower train.micro_batch_size "
            "(`megalm plan` lists layouts that fit)")
    return f"estimated {total:.2f} GB of {gpu_mem_gb:g} GB per GPU (margin {margin:.1f} GB)"


def preflight(cfg: C.Config, world_size: int, gpu_mem_gb: Optional[float] = None, files: bool = True,
              memory_is_error: bool = True, open_data: bool = True) -> Report:
    """Run every check on a loaded config; ``files=False`` skips the file-system ones. The memory
    verdict is an estimate: ``memory_is_error=False`` (the trainer) reports it as a warning.
    ``open_data=False`` only checks the dataset files are there (the trainer opens them right after)."""
    report = Report()
    report.run("layout", lambda: (C.validate_layout(cfg, world_size) or
                                  f"{world_size} ranks = tensor {cfg.parallel.tensor} x pipeline "
                                  f"{cfg.parallel.pipeline} x data {cfg.data_parallel_size(world_size)}"))
    report.run("objective", lambda: _objective(cfg))
    for message in C.schedule_warnings(cfg):
        report.warnings.append(("schedule", message))
    if files:
        try:
            prefixes = data_prefixes(cfg)
        except MegalmError as e:
            report.errors.append(("data", str(e)))
            prefixes = []
        for key, prefix in prefixes:
            report.run("data", lambda key=key, prefix=prefix: _open_dataset(key, prefix, open_data))
        report.run("tokenizer", lambda: _tokenizer(cfg, report))
        if prefixes:
            report.run("cache", lambda: _cache_dir(cfg))
        report.run("run dir", lambda: _writable("run.dir", cfg.run.dir))
        report.run("checkpoint", lambda: _writable("checkpoint.dir", cfg.checkpoint_dir))
        report.run("resume", lambda: _resume(cfg))
    if report.ok:  # a memory verdict only means something for a layout that runs
        try:
            report.passed.append(("memory", _memory(cfg, world_size, gpu_mem_gb, report.vocab_size)))
        except ConfigError as e:
            (report.errors if memory_is_error else report.warnings).append(("memory", str(e)))
    return report


def _objective(cfg: C.Config) -> str:
    """A user objective (``package.module:Class``) must be importable where the job runs."""
    import importlib.util

    name = cfg.objective.name
    if ":" not in name:
        return name
    module, _, cls = name.partition(":")
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found or not cls:
        raise ConfigError(f"objective.name={name!r}: module {module!r} is not importable here (is its package on "
                          "PYTHONPATH / installed in the job's environment?), or the ':Class' part is missing")
    return name


def _world_size_default(cfg: C.Config) -> int:
    """Inside a Slurm allocation, the task count; else tensor x pipeline (one data-parallel rank)."""
    return environment.slurm_ntasks() or cfg.parallel.tensor * cfg.parallel.pipeline


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (configs/*.yaml)")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks the job will run on [SLURM_NTASKS inside a job, else tensor x pipeline]")
    p.add_argument("--ds-config", help="a DeepSpeed JSON to fold in (as pretrain.py --ds-config)")
    p.add_argument("--gpu-mem", type=float, default=None, help="memory per GPU in GB, for a fits / does-not verdict")
    p.add_argument("--no-files", action="store_true", help="config and layout only (no data/tokenizer access)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    ns = p.parse_args(argv)
    try:
        cfg, _ = C.resolve(ns.config, ns.overrides, ns.ds_config, None)
    except MegalmError as e:
        print(f"FAIL config: {e}", file=sys.stderr)
        return 2
    world = ns.world_size or _world_size_default(cfg)
    try:
        C.resolve(ns.config, ns.overrides, ns.ds_config, world)  # the DeepSpeed JSON on `world` ranks
    except MegalmError as e:
        print(f"FAIL layout: {e}", file=sys.stderr)
        return 2
    report = preflight(cfg, world, ns.gpu_mem, files=not ns.no_files)
    for rule, note in report.passed:
        print(f"ok   {rule}: {note}")
    for rule, message in report.warnings:
        print(f"WARN {rule}: {message}")
    for rule, message in report.errors:
        print(f"FAIL {rule}: {message}", file=sys.stderr)
    print(f"{ns.config}: {'ready' if report.ok else f'{len(report.errors)} problem(s)'} on {world} rank(s)")
    return 0 if report.ok else 2


if __name__ == "__main__":
    sys.exit(main())
