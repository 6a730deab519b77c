"""Pretraining entry point, the same under every launcher.

    deepspeed --num_gpus N megalm/pretrain.py --config configs/X.yaml [--ds-config Y.json] [--set k=v ...]
    torchrun --nproc_per_node N megalm/pretrain.py ...      srun / mpirun ... python megalm/pretrain.py ...
    python megalm/pretrain.py ...                            (one process)

Exit codes: 0 done; 75 preempted or out of time, checkpoint saved (requeue me);
otherwise the ``exit_code`` of the megalm error explained on stderr: 2 a user
error (config, data, checkpoint), 3 too many non-finite steps (diagnostic
checkpoint saved).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a file: don't let megalm/ shadow top-level modules
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
import logging
from typing import Optional


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megalm/pretrain.py", description="Pretrain a model with megalm.")
    p.add_argument("--config", help="YAML config (configs/*.yaml)")
    p.add_argument("--ds-config", help="DeepSpeed JSON to fold in (checked against the YAML)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set parallel.tensor=2 train.iters=10")
    p.add_argument("--check", action="store_true",
                   help="run `megalm check` on these arguments and exit (the sbatch scripts do, before srun)")
    p.add_argument("--world-size", type=int, default=None, help="with --check: the ranks the job will run on")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _check_only(args: argparse.Namespace) -> int:
    from megalm.check import main as check_main

    argv = [args.config] if args.config else []
    if not argv:
        print("megalm/pretrain.py --check: --config is required", file=sys.stderr)
        return 2
    if args.ds_config:
        argv += ["--ds-config", args.ds_config]
    if args.world_size:
        argv += ["--world-size", str(args.world_size)]
    if args.overrides:
        argv += ["--set", *args.overrides]
    return check_main(argv)


def _setup_logging(rank: int, level: str) -> None:
    fmt = "%(asctime)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()) if rank == 0 else logging.WARNING,
                        format=fmt, datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _set_threads() -> None:
    """The deepspeed launcher sets no OMP_NUM_THREADS: N ranks on few cores would oversubscribe them."""
    import torch

    from megalm import environment

    if environment.omp_threads_set() or torch.cuda.is_available():
        return
    local = environment.local_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.check:
        return _check_only(args)
    from megalm.training.stop_rules import Preemption

    preempt = Preemption()  # first: Slurm may signal while we are still starting up
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    from megalm import distributed
    from megalm.errors import MegalmError

    info = distributed.init()
    rank, world = info["rank"], info["world_size"]
    _setup_logging(rank, "info")
    _set_threads()
    log = logging.getLogger("megalm")
    try:
        code = _run(args, rank, world, info, preempt)
    except MegalmError as e:
        print(f"megalm: error: {e}" if rank == 0 else f"[rank {rank}] megalm: error: {e}", file=sys.stderr)
        distributed.shutdown(barrier=False)
        return e.exit_code
    except BaseException:
        log.exception("training failed")
        distributed.shutdown(barrier=False)
        raise
    distributed.shutdown()
    return code


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(args: argparse.Namespace, rank: int, world: int, info: dict, preempt) -> int:
    import dataclasses

    import torch

    from megalm import config as C
    from megalm.data.tokenizer import load_tokenizer
    from megalm.distributed import device
    from megalm.errors import ConfigError
    from megalm.model.compile import resolve_compile
    from megalm.objectives import build_objective
    from megalm.training.checkpoint.manager import Checkpointer
    from megalm.training.batches import build_iterators, open_datasets
    from megalm.training.engine import build_engine
    from megalm.training.trainer import build_trainer

    cfg, ds_config = C.resolve(args.config, args.overrides, args.ds_config, world)
    _setup_logging(rank, cfg.run.log_level)
    log = logging.getLogger("megalm")
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision=fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    _preflight(cfg, world, rank, log)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=vocab),
                      train=dataclasses.replace(cfg.train, compile=resolve_compile(cfg.train.compile, device().type)))
    _lock_run_dir(cfg.run.dir, rank)  # before anything is written there: a second job on this run exits at once
    if rank == 0:
        os.makedirs(cfg.run.dir, exist_ok=True)
        with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
            f.write(C.to_yaml(cfg))
        log.info(f"megalm: {world} rank(s) via {info['launcher']} ({info['backend']}); tensor={cfg.parallel.tensor} "
                 f"pipeline={cfg.parallel.pipeline} data={cfg.data_parallel_size(world)} zero={cfg.zero.stage} "
                 f"precision={cfg.precision}; run dir {cfg.run.dir}")
    objective = build_objective(cfg, tokenizer)
    datasets = open_datasets(cfg, tokenizer, objective)  # before the model: bad data fails in seconds
    engine = build_engine(cfg, ds_config, vocab, objective)
    _write_run_info(cfg, engine, rank, world)
    checkpointer = Checkpointer(cfg, engine, rank, world, tokenizer_path=cfg.data.tokenizer)
    start_step, consumed = checkpointer.load()
    train, valid, test = build_iterators(cfg, tokenizer, objective, consumed, engine.dp_rank, engine.dp_size, datasets)
    trainer = build_trainer(cfg, engine=engine, objective=objective, checkpointer=checkpointer, train=train,
                            valid=valid, test=test, device=device(), world_size=world, rank=rank, preemption=preempt)
    try:
        return trainer.train(start_step, consumed)
    finally:
        checkpointer.wait()  # an async save in flight is published before the job exits (preempted or done)


def _lock_run_dir(run_dir: str, rank: int):
    """Rank 0 takes run.dir's lock (released at exit); every rank raises the same error when another job
    holds it."""
    import atexit

    from megalm.errors import CheckpointError
    from megalm.parallel import comm
    from megalm.training.run_lock import RunLock

    lock, error = None, [None]
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except CheckpointError as e:
            error = [str(e)]
    error = comm.all_gather_object(error[0])[:1]  # rank 0's verdict, on every rank
    if error[0]:
        raise CheckpointError(error[0])
    if lock is not None:
        atexit.register(lock.release)


def _preflight(cfg, world: int, rank: int, log: logging.Logger) -> None:
    """``megalm check``'s checks on every rank (a node may lack the shared filesystem): the first
    problem is raised before anything heavy is built; warnings are logged once."""
    import torch

    from megalm.check import preflight

    gpu_mem = torch.cuda.get_device_properties(0).total_memory / 1024**3 if torch.cuda.is_available() else None
    report = preflight(cfg, world, gpu_mem, memory_is_error=False, open_data=False)  # opened next, once
    if rank == 0:
        for rule, message in report.warnings:
            log.warning(f"megalm check: {rule}: {message}")
    if report.errors:
        from megalm.errors import MegalmError

        rule, message = report.errors[0]
        more = f" (and {len(report.errors) - 1} more: run `megalm check` for all)" if len(report.errors) > 1 else ""
        raise MegalmError(f"{message}{more}")


def _write_run_info(cfg, engine, rank: int, world: int) -> None:
    """run.dir/run_info.json: layout and the parameter elements each rank holds (ZeRO-3 partitions them)."""
    import json

    import torch

    from megalm.parallel import comm
    from megalm.training import ds_state

    local = sum(ds_state.local_numel(p) for p in engine.ds.module.parameters())
    counts = comm.all_gather_object(int(local))
    if rank == 0:
        info = {"world_size": world, "tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline,
                "data": engine.dp_size, "zero_stage": cfg.zero.stage, "precision": cfg.precision,
                "param_elements_per_rank": counts, "torch": torch.__version__}
        with open(os.path.join(cfg.run.dir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=1)
        logging.getLogger("megalm").info(f"parameter elements held per rank: {counts}")


if __name__ == "__main__":
    from megalm.distributed import exit_without_teardown

    exit_without_teardown(main())
