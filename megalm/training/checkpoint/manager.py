"""Checkpoints that never lose work: one layout-free copy of the state, parallel writes, exact resume.

Every rank streams its share of the state (write_shards) into ``<root>/.tmp-step_N``,
hashing and fsyncing what it writes; rank 0 gathers the ranks' reports into
MANIFEST.json, renames the directory to ``<root>/step_N`` and only then points
``<root>/latest`` at it (manifest.publish). A kill at any moment leaves the
previous checkpoint intact and ``latest`` naming a complete one. With
``checkpoint.async_save`` the step loop waits only for the copy to host memory.
DeepSpeed's own checkpoint files are not written and never read (they are pickles).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Any, Optional

import torch.distributed as dist

import megalm
from megalm.config import Config
from megalm.errors import CheckpointError
from megalm.parallel import comm
from megalm.training import ds_state
from megalm.training.checkpoint import write_shards
from megalm.training.checkpoint.manifest import publish, verify
from megalm.training.checkpoint.paths import (STATE_FILE, latest_path, list_steps, read_state, resolve_step_dir,
                                              step_name)

logger = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly."""

    def __init__(self, cfg: Config, engine: Any, rank: int, world_size: int, tokenizer_path: Optional[str] = None):
        self.cfg = cfg
        self.engine = engine  # megalm.training.engine.Engine
        self.rank = rank
        self.world_size = world_size
        self.root = cfg.checkpoint_dir
        self.tokenizer_path = tokenizer_path
        self.saved_step: Optional[int] = None  # the step this process saved last
        self.last_stall_s = 0.0  # how long the last save held the step loop
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        # Saves talk over their own gloo group, so a background save never interleaves with training collectives.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() and world_size > 1 else None

    def _barrier(self) -> None:
        comm.barrier()

    # ------------------------------------------------------------------ save

    def maybe_save(self, step: int, consumed_samples: int) -> None:
        """The periodic save: every ``checkpoint.interval`` steps, short of the last (save_at_end covers it)."""
        every = self.cfg.checkpoint.interval
        if every and step % every == 0 and step < self.cfg.train.iters:
            self.save(step, consumed_samples)

    def ensure_saved(self, step: int, consumed_samples: int) -> None:
        """Save ``step`` unless this process has just saved it (a stop right after a periodic save)."""
        if self.saved_step != step:
            self.save(step, consumed_samples)

    def save(self, step: int, consumed_samples: int, diagnostic: bool = False) -> str:
        """Write a checkpoint of ``step`` (async when ``checkpoint.async_save``); return its final path."""
        t0 = time.perf_counter()
        if not diagnostic:
            self.saved_step = step
        self.wait()
        name = step_name(step) + ("-diagnostic" if diagnostic else "")
        tmp = os.path.join(self.root, ".tmp-" + name)
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "megalm"))
        self._barrier()
        run_async = self.cfg.checkpoint.async_save and not diagnostic
        state = self._state(step, consumed_samples) if self.rank == 0 else None
        finish = write_shards.collect(self.engine, self.cfg, tmp, self.rank, copy=run_async)
        if run_async:
            self._thread = threading.Thread(target=self._complete_async, args=(finish, tmp, name, state, step),
                                            name=f"megalm-save-{step}", daemon=True)
            self._thread.start()
            self.last_stall_s = time.perf_counter() - t0
            return os.path.join(self.root, name)
        self._complete(finish, tmp, name, state, step, diagnostic)
        self.last_stall_s = time.perf_counter() - t0
        return os.path.join(self.root, name)

    def wait(self) -> None:
        """Block until the save in flight (if any) is published; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"the background checkpoint save failed: {err}") from err

    def _complete_async(self, *args) -> None:
        try:
            self._complete(*args, diagnostic=False)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            logger.error(f"background checkpoint save failed: {e}")
            self._error = e

    def _complete(self, finish: Any, tmp: str, name: str, state: Optional[dict], step: int,
                  diagnostic: bool) -> None:
        reports = finish()  # this rank's files, written, fsynced, hashed
        gathered = comm.all_gather_object(reports, group=self._group) if self._group is not None else [reports]
        if self.rank == 0:
            merged = {rel: rep for r in gathered for rel, rep in r.items()}
            state["tensor_index"] = write_shards.tensor_index(merged)
            publish(self.root, tmp, name, state, self.tokenizer_path, update_latest=not diagnostic,
                    reports=write_shards.strip_reports(merged))
            if not diagnostic:
                self._prune(step)
            logger.info(f"saved checkpoint {os.path.join(self.root, name)}")
        if self._group is not None:
            comm.barrier(group=self._group)

    def _state(self, step: int, consumed_samples: int) -> dict:
        ds = self.engine.ds
        return {
            "step": step,
            "consumed_samples": consumed_samples,
            "world_size": self.world_size,
            "tensor": self.cfg.parallel.tensor,
            "pipeline": self.cfg.parallel.pipeline,
            "zero_stage": self.cfg.zero.stage,
            "precision": self.cfg.precision,
            "adam_step": ds_state.adam_step(ds),
            "engine": ds_state.engine_counters(ds),
            "deepspeed_api": ds_state.CHECKED_AGAINST,
            "megalm_version": megalm.__version__,
            "config": self.cfg.to_dict(),
        }

    def _prune(self, current: int) -> None:
        keep, every = self.cfg.checkpoint.keep, self.cfg.checkpoint.keep_every
        steps = [s for s in list_steps(self.root) if s <= current]
        for s in steps[:-keep] if keep > 0 else []:
            if every and s % every == 0:
                continue
            shutil.rmtree(os.path.join(self.root, step_name(s)), ignore_errors=True)
        for n in os.listdir(self.root):  # leftovers of saves that were killed
            if n.startswith(".tmp-") and n != ".tmp-" + step_name(current):
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    # ------------------------------------------------------------------ load

    def resolve_resume(self) -> Optional[str]:
        """auto: this run's ``latest``. A path: that checkpoint, unless this run has saved its own since
        (a requeued job continues from its newest checkpoint, not from the one it started from)."""
        how = self.cfg.checkpoint.resume
        if how == "none":
            return None
        own = latest_path(self.root)
        if how == "auto" or own is not None:
            if how != "auto" and self.rank == 0:
                logger.info(f"checkpoint.resume={how}: this run has saved since it started from there; "
                            f"continuing from its own {own}")
            return own
        if not os.path.isdir(how):
            raise CheckpointError(f"checkpoint.resume={how!r}: no such checkpoint directory")
        return resolve_step_dir(how)

    def load(self) -> tuple[int, int]:
        """Restore the newest checkpoint (if any); return (step, consumed_samples)."""
        from megalm.training.checkpoint.restore import load_into_engine

        path = self.resolve_resume()
        if path is None:
            return 0, 0
        mode = self.cfg.checkpoint.verify
        verify(path, only=[STATE_FILE], mode=mode)
        state = read_state(path)
        saved = (state["tensor"], state["pipeline"], state["world_size"], state["zero_stage"])
        now = (self.cfg.parallel.tensor, self.cfg.parallel.pipeline, self.world_size, self.cfg.zero.stage)
        # A checkpoint of an older megalm (no tensor index) is read through its layout-free shards only: its
        # DeepSpeed pickle files are never opened, so its RNG streams start afresh.
        same = saved == now and not state.get("universal_only") and "tensor_index" in state
        carried = load_into_engine(self.engine, self.cfg, path, state, mode, rng_rank=self.rank if same else None)
        step, consumed = int(state["step"]), int(state["consumed_samples"])
        ds_state.set_engine_counters(self.engine.ds, state.get("engine", {}), step, consumed)
        if self.rank == 0:
            if same:
                logger.info(f"resumed from {path} at step {step} ({consumed} samples consumed)")
            else:
                names = ("tensor", "pipeline", "world", "zero")
                change = ", ".join(f"{n} {a}->{b}" for n, a, b in zip(names, saved, now) if a != b) \
                    or "imported weights"
                logger.warning(f"resharded {path} ({change}) at step {step}; optimizer state "
                               f"{'carried over' if carried else 'NOT carried over (fresh Adam moments)'}; "
                               f"RNG streams start afresh")
        return step, consumed
