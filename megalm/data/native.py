"""Optional compiled loops for index builds that are inherently sequential (the blend's greedy rule).

Compiled on first use with the system C compiler into ~/.cache/megalm (or
$MEGALM_CACHE) and loaded with ctypes; when no compiler is available the
callers fall back to Python, with identical results (tests check both).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from typing import Optional

import numpy as np

from megalm import environment

log = logging.getLogger(__name__)

# -ffp-contract=off: no fused multiply-add, so the doubles round exactly as the Python fallback
_SOURCE = r"""
#include <stdint.h>
/* Megatron's greedy blend: sample i goes to argmax_d w[d]*max(i,1) - count[d], first on ties. */
void blend(const double *w, int32_t n, int64_t size, int16_t *dataset_index, int64_t *sample_index,
           int64_t *counts) {
    for (int32_t d = 0; d < n; ++d) counts[d] = 0;
    for (int64_t i = 0; i < size; ++i) {
        double s = i > 1 ? (double)i : 1.0;
        int32_t best = 0;
        double best_err = w[0] * s - (double)counts[0];
        for (int32_t d = 1; d < n; ++d) {
            double err = w[d] * s - (double)counts[d];
            if (err > best_err) { best = d; best_err = err; }
        }
        dataset_index[i] = (int16_t)best;
        sample_index[i] = counts[best];
        counts[best] += 1;
    }
}
"""

_lib: Optional[ctypes.CDLL] = None
_tried = False


def _cache_dir() -> str:
    return environment.cache_dir()


def library() -> Optional[ctypes.CDLL]:
    """The compiled helpers, or None (no compiler, or MEGALM_NO_NATIVE=1)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if environment.native_disabled():
        return None
    cc = shutil.which(environment.c_compiler()) or shutil.which("gcc")
    if cc is None:
        return None
    tag = hashlib.sha1(_SOURCE.encode()).hexdigest()[:12]
    path = os.path.join(_cache_dir(), f"megalm_data_native_{tag}.so")
    try:
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "native.c")
                with open(src, "w") as f:
                    f.write(_SOURCE)
                tmp = os.path.join(d, "native.so")
                subprocess.run([cc, "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o", tmp, src], check=True, capture_output=True,
                               timeout=120)
                staged = f"{path}.tmp.{os.getpid()}"
                shutil.copyfile(tmp, staged)
                os.replace(staged, path)  # atomic: concurrent ranks may compile at once
        lib = ctypes.CDLL(path)
        lib.blend.restype = None
        lib.blend.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p]
        _lib = lib
    except (OSError, subprocess.SubprocessError) as e:
        log.info("native data helpers unavailable (%s); using the Python loops", e)
        _lib = None
    return _lib


def blend(weights: np.ndarray, size: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    lib = library()
    if lib is None:
        return None
    w = np.ascontiguousarray(weights, dtype=np.float64)
    di = np.empty(size, dtype=np.int16)
    si = np.empty(size, dtype=np.int64)
    counts = np.zeros(len(w), dtype=np.int64)
    lib.blend(w.ctypes.data, len(w), size, di.ctypes.data, si.ctypes.data, counts.ctypes.data)
    return di, si
