"""Encoding processes for preprocess that cannot hang: one task per worker, results in input order.

multiprocessing.Pool loses the task of a worker that dies (an OOM kill on one
huge line) and waits for it forever; here each worker owns one pipe, the main
process watches every worker's sentinel, and a death ends the run within a
second with the input and line range that worker held.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import sys
import traceback
from typing import Any, Callable, Iterator

from megalm.errors import DataError, MegalmError

log = logging.getLogger(__name__)
_END = object()


def _serve(conn, fn: Callable, init: Callable, init_args: tuple) -> None:
    init(*init_args)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        seq, task = msg
        try:
            out = (seq, True, fn(task))
        except MegalmError as e:
            out = (seq, False, e)
        except BaseException:  # noqa: BLE001 - a bug: carry the worker's traceback to the main process
            out = (seq, False, RuntimeError(traceback.format_exc()))
        conn.send(out)


def _death(proc) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class WorkerPool:
    """``n`` processes running ``fn`` on tasks; ``describe(task)`` names a task in error messages."""

    def __init__(self, n: int, fn: Callable, init: Callable, init_args: tuple,
                 describe: Callable[[Any], str] = str) -> None:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.describe = describe
        self.procs, self.conns = [], []
        for _ in range(n):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_serve, args=(child, fn, init, init_args), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)

    def ordered(self, tasks: Iterator, ahead: int = 1) -> Iterator[Any]:
        """``fn(task)`` for each task, in order; at most one task per worker plus ``ahead`` finished results
        are held, so memory stays bounded by the workers, not the input."""
        n = len(self.procs)
        idle = collections.deque(range(n))
        held: dict[int, tuple[int, Any]] = {}  # worker -> (seq, task)
        done: dict[int, Any] = {}
        next_seq = submitted = 0
        tasks = iter(tasks)
        exhausted = False
        while True:
            while idle and not exhausted and submitted - next_seq < n + ahead:
                task = next(tasks, _END)
                if task is _END:
                    exhausted = True
                    break
                w = idle.popleft()
                held[w] = (submitted, task)
                try:
                    self.conns[w].send((submitted, task))
                except OSError:
                    self._died(w, task)
                submitted += 1
            if next_seq in done:
                yield done.pop(next_seq)
                next_seq += 1
                continue
            if exhausted and next_seq == submitted:
                return
            busy = list(held)
            ready = set(mpc.wait([self.conns[w] for w in busy] + [self.procs[w].sentinel for w in busy],
                                 timeout=1.0))
            for w in busy:
                conn, proc = self.conns[w], self.procs[w]
                if conn in ready:
                    try:
                        seq, ok, value = conn.recv()
                    except (EOFError, OSError):
                        self._died(w, held[w][1])
                    if not ok:
                        raise value
                    done[seq] = value
                    del held[w]
                    idle.append(w)
                elif proc.sentinel in ready or not proc.is_alive():
                    self._died(w, held[w][1])

    def _died(self, w: int, task: Any) -> None:
        proc = self.procs[w]
        proc.join(timeout=1.0)
        raise DataError(f"encoding worker {w} (pid {proc.pid}) {_death(proc)} while encoding "
                        f"{self.describe(task)}; no output was kept. Rerun with fewer --workers or a smaller "
                        "--chunk-mb, or split or drop that input")

    def close(self) -> None:
        for conn, p in zip(self.conns, self.procs):
            try:
                if p.is_alive():
                    conn.send(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()
        for conn in self.conns:
            conn.close()
