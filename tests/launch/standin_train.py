"""A stand-in for megalm/pretrain.py with the same launch contract, small enough to test the launchers.

Ranks come from RANK/WORLD_SIZE (set by the launch scripts from SLURM_PROCID/SLURM_NTASKS) with
MASTER_ADDR/MASTER_PORT; each step all-reduces a number over gloo, so both ranks must really meet.
It writes run_dir/metrics.jsonl, keeps a checkpoint in run_dir/ckpt.json, resumes from it, and on
USR1/TERM finishes the step, checkpoints and exits 75 -- the contract of megalm/pretrain.py.

    python standin_train.py --config X.yaml --set run.dir=D --set train.iters=N [--set step_seconds=S]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--ds-config")
    parser.add_argument("--set", action="append", default=[])
    ns = parser.parse_args()
    sets = dict(item.split("=", 1) for item in ns.set)
    run_dir, iters = sets["run.dir"], int(sets["train.iters"])
    step_seconds = float(sets.get("step_seconds", "0.2"))
    assert os.path.exists(ns.config), ns.config

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ckpt = os.path.join(run_dir, "ckpt.json")
    step, loss = 0, 10.0
    if os.path.exists(ckpt):
        with open(ckpt) as f:
            state = json.load(f)
        step, loss = state["step"], state["loss"]
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, f"rank{rank}.json"), "a") as f:
        f.write(json.dumps({"rank": rank, "world": world, "host": socket.gethostname(),
                            "node": os.environ.get("SLURMD_NODENAME"), "resumed_from": step,
                            "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
                            "master": os.environ["MASTER_ADDR"] + ":" + os.environ["MASTER_PORT"]}) + "\n")
    code = 0
    while step < iters:
        # every rank contributes; the "loss" depends on the step only, so a resumed run ends the same
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        assert t.item() == world * (world + 1) / 2
        loss = loss * 0.9 + 0.01 * step
        step += 1
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": loss, "sum": t.item()}) + "\n")
        time.sleep(step_seconds)
        flag = torch.tensor([1.0 if stop["sig"] else 0.0])
        dist.all_reduce(flag)  # all ranks stop on the same step
        if flag.item() > 0 and step < iters:
            code = 75
            break
    if rank == 0:
        with open(ckpt + ".tmp", "w") as f:
            json.dump({"step": step, "loss": loss}, f)
        os.replace(ckpt + ".tmp", ckpt)
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
