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
from dataclasses import dataclass
from typing import Any, Callable

import torch

from megalm.config import Config
from megalm.training import ds_state
from megalm.training.checkpoint import checksum
from megalm.training.checkpoint.paths import OPTIM_DIR, RNG_DIR, WEIGHTS_DIR, rng_file
from megalm.training.checkpoint.rng import rng_state
from megalm.training.checkpoint.shard_writer import ShardWriter
from megalm.training.param_names import model_param_names


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


class RankShare:
    """This rank's share of one save: the files it writes, what goes in each, and (async) the host copies."""

    def __init__(self, engine: Any, cfg: Config, tmp: str, rank: int, copy: bool):
        from megalm.parallel import state

        self.engine, self.tmp, self.copy = engine, tmp, copy
        self.tp_rank, pp_rank = state.tensor_rank(), state.pipeline_rank()
        self.items = plan(model_param_names(engine, cfg), self.tp_rank, engine.dp_size)
        self.with_optim = ds_state.has_adam_state(engine.ds)
        if self.with_optim:
            ds_state.relink_fragments(engine.ds)
        mine = [it for it in self.items if it.writer == engine.dp_rank]
        tag = f"tp{self.tp_rank:02d}-pp{pp_rank:02d}-dp{engine.dp_rank:03d}"
        self.meta = {"tensor_size": state.tensor_size(), "tensor_rank": self.tp_rank,
                     "pipeline_size": state.pipeline_size(), "pipeline_rank": pp_rank,
                     "params": {it.name: it.partition for it in mine}}
        if self.with_optim:
            self.meta["adam_step"] = ds_state.adam_step(engine.ds)
        self.wrel = os.path.join(WEIGHTS_DIR, tag + ".safetensors")
        self.orel = os.path.join(OPTIM_DIR, tag + ".safetensors")
        self.files = {}  # relative path -> (entries, kind)
        if mine:
            self.files[self.wrel] = ([(it.name, torch.float32, ds_state.full_shape(it.param)) for it in mine],
                                     "weights")
            if self.with_optim:
                self.files[self.orel] = ([(f"{it.name}/{k}", torch.float32, ds_state.full_shape(it.param))
                                          for it in mine for k in ds_state.ADAM_KEYS], "optim")
        rng_tensors, self.rng_plain = rng_state()
        self.rng_rel = rng_file(rank)
        self.rng_entries = [(k, v.dtype, tuple(v.shape)) for k, v in rng_tensors.items()]
        self.snapshot: dict[str, torch.Tensor] = {k: v.clone() for k, v in rng_tensors.items()}
        self.writers: dict[str, ShardWriter] = {}

    def open_writers(self) -> None:
        for rel, (entries, _) in self.files.items():
            os.makedirs(os.path.dirname(os.path.join(self.tmp, rel)), exist_ok=True)
            self.writers[rel] = ShardWriter(os.path.join(self.tmp, rel), entries, {"megalm": json.dumps(self.meta)})

    def gather(self) -> None:
        """Fetch every tensor (collective under ZeRO: all ranks, same order) and write or copy this rank's."""
        ds, me = self.engine.ds, self.engine.dp_rank
        for it in self.items:
            value = ds_state.get_fp32(it.param)
            moments = {k: ds_state.get_moment(ds, it.param, k) for k in ds_state.ADAM_KEYS} if self.with_optim else {}
            if it.writer != me:
                continue
            if any(m is None for m in moments.values()):
                raise RuntimeError(f"no Adam state for {it.name} although the optimizer has stepped (a megalm bug)")
            tensors = {(self.wrel, it.name): value.float()}
            tensors.update({(self.orel, f"{it.name}/{k}"): m.float() for k, m in moments.items()})
            for (rel, key), t in tensors.items():
                if self.copy:
                    self.snapshot[key] = t.detach().to("cpu", copy=True)
                else:
                    self.writers[rel].write(key, t)

    def finish(self) -> dict:
        """Write what is left, close (fsync, hash) every file; return the reports."""
        if self.copy:
            self.open_writers()
            for rel, (entries, _) in self.files.items():
                for key, _, _ in entries:
                    self.writers[rel].write(key, self.snapshot.pop(key))
        reports = {}
        for rel, w in self.writers.items():
            size, sha = w.close()
            entries, kind = self.files[rel]
            reports[rel] = {**checksum.entry(size, sha), "kind": kind, "tensor_rank": self.tp_rank,
                            "keys": {k: self.meta["params"][k.split("/", 1)[0]] for k, _, _ in entries}}
        os.makedirs(os.path.join(self.tmp, RNG_DIR), exist_ok=True)
        rw = ShardWriter(os.path.join(self.tmp, self.rng_rel), self.rng_entries, {"plain": json.dumps(self.rng_plain)})
        for k, _, _ in self.rng_entries:
            rw.write(k, self.snapshot.pop(k))
        size, sha = rw.close()
        reports[self.rng_rel] = checksum.entry(size, sha)
        return reports


def collect(engine: Any, cfg: Config, tmp: str, rank: int, copy: bool) -> Callable[[], dict]:
    """Every rank calls this (ZeRO gathers are collective). With ``copy=False`` the files are written now and
    the returned function only hands back the reports; with ``copy=True`` this rank's tensors are copied to
    host memory and the returned function writes them (call it from a background thread).

    A report maps each relative path written to {size, <checksum algorithm>: digest} and, for shard files,
    what it holds.
    """
    share = RankShare(engine, cfg, tmp, rank, copy)
    if not copy:
        share.open_writers()
    share.gather()
    return share.finish


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
