"""Checkpoint cost against its floor, measured as ratios in one run (one process, or TP2 under torchrun).

    python benchmarks/checkpoint_bench.py --layers 24 --hidden 1024 --heads 16 --ffn 2816 --vocab 32000
    torchrun --nproc_per_node 2 benchmarks/checkpoint_bench.py ... --tensor 2

Builds megalm's DeepSpeed engine (fp32, ZeRO-0, AdamW) for a GPT, fills the Adam state
as a step would, then alternates, ``--rounds`` times:
- megalm's save (every rank streams its share, hashing and fsyncing) vs the floor: bare
  ``safetensors.torch.save_file`` of the same tensors per rank, plus an fsync;
- megalm's load with ``checkpoint.verify=size`` vs the floor: ``load_file`` of the same
  tensors per rank, copied into place; ``verify=full`` vs that floor plus a bare checksum of
  the same bytes (what checking a checksum costs at least);
- an async save's stall of the step loop vs the bare copy of the same tensors to host memory.
It also reports bytes on disk / bytes of the state, and the peak RSS above the pre-save level.
Prints one JSON line (rank 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import types

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    return p.parse_args(argv)


class PeakRSS:
    """Highest resident set size seen by a 5 ms sampler between start() and stop(), in bytes."""

    def __init__(self):
        self.peak, self._run = 0, False

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self):
        self.peak, self._run = self.now(), True
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while self._run:
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def stop(self) -> int:
        self._run = False
        self._t.join()
        return max(self.peak, self.now())


def build(a, root: str):
    from megalm import config as C
    from megalm.objectives import build_objective
    from megalm.training.engine import build_engine

    world = dist.get_world_size()
    sets = [f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}", f"model.num_heads={a.heads}",
            f"model.ffn_hidden_size={a.ffn}", f"model.vocab_size={a.vocab}", "model.seq_length=128",
            "model.position=rope", "model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false",
            "model.tie_embeddings=false", "precision=fp32", f"parallel.tensor={a.tensor}",
            "train.micro_batch_size=1", f"train.global_batch_size={world // a.tensor}", f"run.dir={root}",
            "run.tensorboard=false", "data.tokenizer=unused.model"]
    cfg, ds_config = C.resolve(None, sets, None, world)
    tok = types.SimpleNamespace(eod=0, pad=0, vocab_size=a.vocab, bos=1, eos=0, mask=2, cls=1, sep=0)
    engine = build_engine(cfg, ds_config, a.vocab, build_objective(cfg, tok))
    return cfg, engine


def fill_adam_state(engine) -> None:
    """The state after a step: moments of the right shapes with non-trivial values."""
    from megalm.training import ds_state

    ds_state.ensure_adam_state(engine.ds, 1)
    g = torch.Generator().manual_seed(dist.get_rank())
    inner = ds_state.inner_optimizer(engine.ds)
    for st in inner.state.values():
        st["exp_avg"].normal_(generator=g)
        st["exp_avg_sq"].uniform_(generator=g)


def my_tensors(engine, cfg) -> dict[str, torch.Tensor]:
    """The tensors this rank writes in a megalm save (same plan), for the floors."""
    from megalm.parallel import state
    from megalm.training import ds_state
    from megalm.training.param_names import model_param_names
    from megalm.training.checkpoint.write_shards import plan

    out = {}
    for it in plan(model_param_names(engine, cfg), state.tensor_rank(), engine.dp_size):
        if it.writer == engine.dp_rank:
            out[it.name] = ds_state.get_fp32(it.param)
            for k in ds_state.ADAM_KEYS:
                out[f"{it.name}/{k}"] = ds_state.get_moment(engine.ds, it.param, k)
    return out


def timed(fn) -> float:
    """Seconds of ``fn`` on every rank (the slowest), each timing starting from a synced disk: the virtual disk
    here otherwise carries one phase's writeback (or the previous checkpoint's deletion) into the next."""
    os.sync()
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)


def main(argv=None) -> int:
    a = parse(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megalm import distributed
    from megalm.training.checkpoint.manager import Checkpointer

    distributed.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    root = a.dir or (tempfile.mkdtemp(prefix="ckpt_bench_", dir="/tmp") if rank == 0 else None)
    holder = [root]
    dist.broadcast_object_list(holder, src=0)
    root = holder[0]
    cfg, engine = build(a, root)
    fill_adam_state(engine)
    tensors = my_tensors(engine, cfg)
    state_bytes_mine = sum(t.numel() * t.element_size() for t in tensors.values())
    sizes = [None] * world
    dist.all_gather_object(sizes, state_bytes_mine)
    params = sum(p.numel() for p in engine.ds.module.parameters())
    counts = [None] * world
    dist.all_gather_object(counts, params)

    from safetensors.torch import load_file, save_file

    from megalm.training.checkpoint import checksum

    floor_dir = os.path.join(root, "floor")
    os.makedirs(floor_dir, exist_ok=True)
    floor_file = os.path.join(floor_dir, f"rank{rank}.safetensors")

    def floor_save():
        save_file({k: v.contiguous() for k, v in tensors.items()}, floor_file)
        with open(floor_file, "rb") as f:
            os.fsync(f.fileno())

    def floor_load():  # read and put the values where they live (the same tensors), as a resume must
        for k, v in load_file(floor_file).items():
            tensors[k].copy_(v)

    def floor_hash():
        checksum.of_file(floor_file)

    def floor_copy():
        {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}

    ck = Checkpointer(cfg, engine, rank, world)
    results: dict[str, list] = {k: [] for k in ("floor_save", "save", "floor_load", "floor_hash", "load_full", "load_size",
                                                "copy", "async_stall", "async_total", "save_rss", "async_rss")}
    step = 0
    for r in range(a.rounds):
        step += 1
        if r % 2:  # the floor first in odd rounds, second in even ones: neither inherits the disk state more often
            results["floor_save"].append(timed(floor_save))
        base = PeakRSS.now()
        rss = PeakRSS().start()
        results["save"].append(timed(lambda: ck.save(step, 0)))
        results["save_rss"].append(rss.stop() - base)
        if not r % 2:
            results["floor_save"].append(timed(floor_save))
        results["floor_load"].append(timed(floor_load))
        results["floor_hash"].append(timed(floor_hash))
        for mode in ("full", "size"):
            ck.cfg = cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, verify=mode, resume="auto"))
            results[f"load_{mode}"].append(timed(ck.load))
        results["copy"].append(timed(floor_copy))
        ck.cfg = cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, async_save=True))
        step += 1
        base = PeakRSS.now()
        rss = PeakRSS().start()
        t0 = time.perf_counter()
        results["async_stall"].append(timed(lambda: ck.save(step, 0)))
        ck.wait()
        dist.barrier()
        results["async_total"].append(time.perf_counter() - t0)
        results["async_rss"].append(rss.stop() - base)
        ck.cfg = cfg
    disk = dir_bytes(os.path.join(cfg.checkpoint_dir, f"step_{step:08d}"))
    med = {k: statistics.median(v) for k, v in results.items()}
    per_rank = [None] * world
    dist.all_gather_object(per_rank, med)
    rounds = [None] * world
    dist.all_gather_object(rounds, results)
    if rank == 0:
        worst = {k: max(r[k] for r in per_rank) for k in med}
        state_bytes = sum(sizes)
        out = {
            "world": world, "tensor": a.tensor, "param_elements_per_rank": counts,
            "state_bytes": state_bytes, "disk_bytes": disk, "bytes_ratio": disk / state_bytes,
            "save_s": worst["save"], "floor_save_s": worst["floor_save"], "save_ratio": worst["save"] / worst["floor_save"],
            "load_full_s": worst["load_full"], "load_size_s": worst["load_size"], "floor_load_s": worst["floor_load"],
            "floor_hash_s": worst["floor_hash"],
            "load_full_ratio": worst["load_full"] / (worst["floor_load"] + worst["floor_hash"]),
            "load_size_ratio": worst["load_size"] / worst["floor_load"],
            "async_stall_s": worst["async_stall"], "copy_s": worst["copy"],
            "stall_ratio": worst["async_stall"] / worst["copy"], "async_total_s": worst["async_total"],
            "save_extra_rss_gb": worst["save_rss"] / 2**30, "async_extra_rss_gb": worst["async_rss"] / 2**30,
            "rank_state_gb": max(sizes) / 2**30, "rounds": a.rounds,
            "save_ratio_per_round": [s / f for s, f in zip(results["save"], results["floor_save"])],
            # the paired estimate: rounds alternate which of the two goes first, and the geometric mean of
            # the per-round ratios cancels the penalty of going second on this disk
            "save_ratio_geomean": statistics.geometric_mean(s / f for s, f in zip(results["save"],
                                                                                   results["floor_save"])),
            "per_round": rounds,
        }
        print(json.dumps(out))
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
