"""Progress reporting for long tools: a live bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional, TextIO

log = logging.getLogger("megalm.data.preprocess")


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """docs/s, MB/s and ETA from bytes read of ``total_bytes`` (compressed bytes for .gz inputs)."""

    def __init__(self, total_bytes: int, stream: Optional[TextIO] = None, interval: float = 10.0,
                 enabled: bool = True) -> None:
        self.total = max(total_bytes, 1)
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.interval = 0.2 if self.tty else interval
        self.t0 = time.time()
        self._last = self.t0  # first report after one interval; short runs only print the summary

    def update(self, docs: int, raw_bytes: int, pos_bytes: int, force: bool = False) -> None:
        now = time.time()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        if force and not self.tty and self._last == self.t0:
            return  # nothing was reported yet: the caller's summary says it all
        self._last = now
        dt = max(now - self.t0, 1e-9)
        frac = min(pos_bytes / self.total, 1.0)
        eta = dt * (1 - frac) / frac if frac > 0 else float("inf")
        msg = (f"{frac * 100:5.1f}% | {docs:,} docs | {docs / dt:,.0f} docs/s | "
               f"{raw_bytes / dt / 1e6:,.1f} MB/s | elapsed {_fmt_time(dt)} | "
               f"ETA {_fmt_time(eta) if eta != float('inf') else '?'}")
        if self.tty:
            width = 30
            filled = int(frac * width)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {msg}\x1b[K")
            self.stream.flush()
        else:
            log.info(msg)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
