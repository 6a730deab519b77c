"""What each rank writes into a checkpoint: its share of the layout-free training state, streamed.

One copy of the state: the fp32 master value and Adam moments of every parameter
(keyed by ``build_model`` names, TP shards with their partition dim) and this rank's
RNG. Each (tensor rank, pipeline stage) splits its parameters over its data-parallel
ranks by size; a tensor is written by exactly one rank (replicated ones by tensor rank
0), one at a time, hashed while written. For an async save the same tensors are first
copied to host memory and written later by a thread.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from megalm.config import Config
from megalm.training import checksum, ds_state
from megalm.training.param_names import model_param_names
from megalm.training.shard_writer import ShardWriter

WEIGHTS_DIR = os.path.join("megalm", "weights")
OPTIM_DIR = os.path.join("megalm", "optim")
RNG_DIR = os.path.join("megalm", "rng")


def rng_file(rank: int) -> str:
    return os.path.join(RNG_DIR, f"rank{rank:05d}.safetensors")


@dataclass
class Item:
    name: str
    param: torch.nn.Parameter
    writer: int  # data-parallel rank that writes it, -1 = nobody on this (TP, PP) slice
    partition: dict


def partition_of(p: torch.nn.Parameter) -> dict:
    if getattr(p, "tensor_model_parallel", False):
        return {"dim": int(p.partition_dim), "partitions": [int(x) for x in p.partitions]}
    return {"dim": None, "partitions": None}


def plan(params: dict[str, torch.nn.Parameter], tensor_rank: int, dp_size: int) -> list[Item]:
    """Who writes what: largest tensors first to the least-loaded DP rank (same answer on every rank)."""
    load = [0] * dp_size
    writer = {}
    order = sorted(params, key=lambda n: (-_numel(params[n]), n))
    for n in order:
        part = partition_of(params[n])
        if part["dim"] is None and tensor_rank != 0:
            writer[n] = -1  # replicated over TP: tensor rank 0's copy is the one on disk
            continue
        w = min(range(dp_size), key=lambda r: (load[r], r))
        load[w] += _numel(params[n])
        writer[n] = w
    return [Item(n, p, writer[n], partition_of(p)) for n, p in params.items()]


def _numel(p: torch.nn.Parameter) -> int:
    n = 1
    for d in ds_state.full_shape(p):
        n *= d
    return n


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-able states) of every RNG this rank uses."""
    from megalm.parallel import random as tp_random

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    for name, st in tp_random.get_tracker().get_states().items():
        tensors[f"tracker/{name}"] = st
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    from megalm.parallel import random as tp_random

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("tracker/")}
    if tracker:
        tp_random.get_tracker().set_states(tracker)
    py = plain["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = plain["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))


def collect(engine: Any, cfg: Config, tmp: str, rank: int, copy: bool) -> Callable[[], dict]:
    """Every rank calls this (ZeRO gathers are collective). With ``copy=False`` the files are written now and
    the returned function only hands back the reports; with ``copy=True`` this rank's tensors are copied to
    host memory and the returned function writes them (call it from a background thread).

    A report maps each relative path written to {size, <checksum algorithm>: digest} and, for shard files, what it holds.
    """
    from megalm.parallel import state

    ds = engine.ds
    params = model_param_names(engine, cfg)
    tp_rank, pp_rank = state.tensor_rank(), state.pipeline_rank()
    items = plan(params, tp_rank, engine.dp_size)
    with_optim = ds_state.has_adam_state(ds)
    if with_optim:
        ds_state.relink_fragments(ds)
    mine = [it for it in items if it.writer == engine.dp_rank]
    tag = f"tp{tp_rank:02d}-pp{pp_rank:02d}-dp{engine.dp_rank:03d}"
    meta = {"tensor_size": state.tensor_size(), "tensor_rank": tp_rank, "pipeline_size": state.pipeline_size(),
            "pipeline_rank": pp_rank, "params": {it.name: it.partition for it in mine}}
    if with_optim:
        meta["adam_step"] = ds_state.adam_step(ds)
    files = {}
    if mine:
        files[os.path.join(WEIGHTS_DIR, tag + ".safetensors")] = (
            [(it.name, torch.float32, ds_state.full_shape(it.param)) for it in mine], "weights")
        if with_optim:
            files[os.path.join(OPTIM_DIR, tag + ".safetensors")] = (
                [(f"{it.name}/{k}", torch.float32, ds_state.full_shape(it.param)) for it in mine
                 for k in ds_state.ADAM_KEYS], "optim")
    rng_tensors, rng_plain = rng_state()
    rng_rel = rng_file(rank)
    rng_entries = [(k, v.dtype, tuple(v.shape)) for k, v in rng_tensors.items()]
    snapshot: dict[str, torch.Tensor] = {k: v.clone() for k, v in rng_tensors.items()}
    writers: dict[str, ShardWriter] = {}

    def open_writers() -> None:
        for rel, (entries, _) in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            writers[rel] = ShardWriter(os.path.join(tmp, rel), entries, {"megalm": json.dumps(meta)})

    if not copy:
        open_writers()
    wrel = os.path.join(WEIGHTS_DIR, tag + ".safetensors")
    orel = os.path.join(OPTIM_DIR, tag + ".safetensors")
    for it in items:  # same order on every rank: the ZeRO gathers inside are collective
        value = ds_state.get_fp32(it.param)
        moments = {k: ds_state.get_moment(ds, it.param, k) for k in ds_state.ADAM_KEYS} if with_optim else {}
        if it.writer != engine.dp_rank:
            continue
        if any(m is None for m in moments.values()):
            raise RuntimeError(f"no Adam state for {it.name} although the optimizer has stepped (a megalm bug)")
        tensors = {(wrel, it.name): value.float()}
        tensors.update({(orel, f"{it.name}/{k}"): m.float() for k, m in moments.items()})
        for (rel, key), t in tensors.items():
            if copy:
                snapshot[key] = t.detach().to("cpu", copy=True)
            else:
                writers[rel].write(key, t)

    def finish() -> dict:
        if copy:
            open_writers()
            for rel, (entries, _) in files.items():
                for key, _, _ in entries:
                    writers[rel].write(key, snapshot.pop(key))
        reports = {}
        for rel, w in writers.items():
            size, sha = w.close()
            entries, kind = files[rel]
            reports[rel] = {**checksum.entry(size, sha), "kind": kind, "tensor_rank": tp_rank,
                            "keys": {k: meta["params"][k.split("/", 1)[0]] for k, _, _ in entries}}
        os.makedirs(os.path.join(tmp, RNG_DIR), exist_ok=True)
        rw = ShardWriter(os.path.join(tmp, rng_rel), rng_entries, {"plain": json.dumps(rng_plain)})
        for k, _, _ in rng_entries:
            rw.write(k, snapshot.pop(k))
        size, sha = rw.close()
        reports[rng_rel] = checksum.entry(size, sha)
        return reports

    return finish


def tensor_index(reports: dict[str, dict]) -> dict[str, dict]:
    """{'weights'|'optim': {key: {partition, pieces: {tensor rank: file}}}} from the ranks' reports."""
    index: dict[str, dict] = {"weights": {}, "optim": {}}
    for rel, rep in sorted(reports.items()):
        if "kind" not in rep:
            continue
        for key, part in rep["keys"].items():
            entry = index[rep["kind"]].setdefault(key, {"partition": part, "pieces": {}})
            entry["pieces"][str(rep["tensor_rank"])] = rel
    return index


def strip_reports(reports: dict[str, dict]) -> dict[str, dict]:
    """The manifest's part of a report: size and checksum."""
    return {rel: checksum.entry(r["size"], r[checksum.ALGORITHM]) for rel, r in reports.items()}

