"""Every random-number stream a rank uses (torch, CUDA, the TP tracker, Python, NumPy), saved and restored.

A resume at the same layout restores each rank's streams, so dropout and sampling continue exactly.
"""

from __future__ import annotations

import random

import numpy as np
import torch


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
