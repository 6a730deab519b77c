"""Every touch of DeepSpeed's optimizer internals that checkpoints need, in one place.

Checked against DeepSpeed 0.19.8 (torch 2.13): ZeRO-0 fp32 hands the client torch
optimizer through; bf16 without ZeRO wraps it in ``BF16_Optimizer`` (fp32 flat
partitions in ``fp32_groups_flat_partition``); ZeRO-1/2 in
``DeepSpeedZeroOptimizer`` (``single_partition_of_fp32_groups``); ZeRO-3 in
``DeepSpeedZeroOptimizer_Stage3`` (``fp32_partitioned_groups_flat``). The full
fp32 value and Adam moments of one parameter go through the public
``deepspeed.utils.safe_{get,set}_full_*`` helpers (collective over data-parallel
ranks for ZeRO). Re-check these names when DeepSpeed moves.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

CHECKED_AGAINST = "deepspeed 0.19.8"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """This rank's (TP-local) shape of a parameter, also when ZeRO-3 has partitioned it away."""
    return tuple(p.ds_shape) if is_zero3(p) else tuple(p.shape)


def inner_optimizer(ds: Any) -> Any:
    """The torch optimizer that holds the Adam state (DeepSpeed wraps it for bf16 and ZeRO)."""
    opt = ds.optimizer
    return getattr(opt, "optimizer", None) or opt


def _flat_masters(ds: Any) -> list[torch.Tensor]:
    """The tensors the inner optimizer keys its state by."""
    opt = ds.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(opt, attr, None)
        if flats:
            return [f for f in flats if f is not None and f.numel() > 0]
    return [p for g in inner_optimizer(ds).param_groups for p in g["params"]]


def has_adam_state(ds: Any) -> bool:
    state = inner_optimizer(ds).state
    return any("exp_avg" in state.get(f, {}) for f in _flat_masters(ds))


def adam_step(ds: Any) -> int:
    """Adam's own step count (fp16 skipped steps excluded)."""
    state = inner_optimizer(ds).state
    for f in _flat_masters(ds):
        if "step" in state.get(f, {}):
            return int(torch.as_tensor(state[f]["step"]).item())
    return 0


def ensure_adam_state(ds: Any, step: int) -> None:
    """Give every fp32 master an Adam state (zeros if the optimizer has not stepped yet) at ``step``,
    so the moments of a checkpoint can be set into it, then relink ZeRO's per-parameter fragments."""
    inner = inner_optimizer(ds)
    for f in _flat_masters(ds):
        st = inner.state[f]
        for k in ADAM_KEYS:
            if k not in st:
                st[k] = torch.zeros_like(f, memory_format=torch.preserve_format)
        old = st.get("step")
        # torch Adam keeps a float32 0-d tensor, DeepSpeed's CPU Adam an int: keep whichever it uses
        st["step"] = step if isinstance(old, int) or _cpu_adam(inner) else torch.tensor(float(step),
                                                                                      dtype=torch.float32)
    opt = ds.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _cpu_adam(inner: Any) -> bool:
    return type(inner).__name__ == "DeepSpeedCPUAdam"


def relink_fragments(ds: Any) -> None:
    """ZeRO-1/2 and bf16 link each parameter to its slice of the Adam state once, lazily; when that ran
    before the state existed, safe_get_full_optimizer_state finds nothing. Link again."""
    opt = ds.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and inner_optimizer(ds).state:
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def get_fp32(p: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 master value of ``p`` (its TP shard); collective under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p)
    return (p.detach() if value is None else value).reshape(full_shape(p))


def get_moment(ds: Any, p: torch.nn.Parameter, key: str) -> Optional[torch.Tensor]:
    if is_zero3(p) or hasattr(p, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_optimizer_state

        value = safe_get_full_optimizer_state(p, key)
        return None if value is None else value.reshape(full_shape(p))
    st = inner_optimizer(ds).state.get(p, {})
    return st[key].detach() if key in st else None


def set_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set the fp32 master and the module's (lower-precision) copy of ``p`` to ``value``."""
    from deepspeed.utils import safe_set_full_fp32_param

    if is_zero3(p):
        import deepspeed

        safe_set_full_fp32_param(p, value.to(torch.float32))
        # the module's partition is separate from the fp32 master: gather, set, re-partition
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.reshape(p.shape).to(p.dtype))
        return
    p.data.copy_(value.to(p.dtype))
    if hasattr(p, "_hp_mapping"):
        safe_set_full_fp32_param(p, value.to(torch.float32))


def set_moment(ds: Any, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    if is_zero3(p) or hasattr(p, "_hp_mapping"):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(p, value, key)
        return
    inner_optimizer(ds).state[p][key].copy_(value)


def scaler_state(ds: Any) -> Optional[dict]:
    """fp16 dynamic loss scaler counters (None for fp32/bf16)."""
    scaler = getattr(ds.optimizer, "loss_scaler", None)
    if scaler is None or not hasattr(scaler, "cur_scale"):
        return None
    return {k: _plain(getattr(scaler, k)) for k in _SCALER_FIELDS if hasattr(scaler, k)}


def set_scaler_state(ds: Any, saved: Optional[dict]) -> None:
    scaler = getattr(ds.optimizer, "loss_scaler", None)
    if not saved or scaler is None:
        return
    for k, v in saved.items():
        setattr(scaler, k, v)


def _plain(v: Any) -> Any:
    return v.item() if torch.is_tensor(v) else v


def engine_counters(ds: Any) -> dict:
    sched = getattr(ds, "lr_scheduler", None)
    return {"global_steps": int(ds.global_steps), "global_samples": int(ds.global_samples),
            "skipped_steps": int(getattr(ds, "skipped_steps", 0)),
            "scheduler_last_epoch": None if sched is None else int(sched.last_epoch),
            "loss_scaler": scaler_state(ds)}


def set_engine_counters(ds: Any, counters: dict, step: int, consumed: int) -> None:
    """Restore DeepSpeed's step counters, the LR schedule position and the loss scaler."""
    ds.global_steps = int(counters.get("global_steps", step))
    ds.global_samples = int(counters.get("global_samples", consumed))
    if hasattr(ds, "skipped_steps"):
        ds.skipped_steps = int(counters.get("skipped_steps", 0))
    sched = getattr(ds, "lr_scheduler", None)
    last = counters.get("scheduler_last_epoch")
    last = step if last is None else int(last)
    if sched is not None and last > 0:
        sched.last_epoch = last - 1
        sched.step()  # sets the optimizer's learning rates exactly as the uninterrupted run did
    set_scaler_state(ds, counters.get("loss_scaler"))
