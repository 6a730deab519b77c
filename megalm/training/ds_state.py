"""Every touch of DeepSpeed's internals in megalm, in one place: optimizer state, step hook, counters.

Checked against DeepSpeed 0.19.8 (torch 2.13): ZeRO-0 fp32 hands the client torch
optimizer through; bf16 without ZeRO wraps it in ``BF16_Optimizer`` (fp32 flat
partitions in ``fp32_groups_flat_partition``); ZeRO-1/2 in
``DeepSpeedZeroOptimizer`` (``single_partition_of_fp32_groups``); ZeRO-3 in
``DeepSpeedZeroOptimizer_Stage3`` (``fp32_partitioned_groups_flat``). The full
fp32 value and Adam moments of one parameter go through the public
``deepspeed.utils.safe_{get,set}_full_*`` helpers (collective over data-parallel
ranks for ZeRO). Private names used: ``engine._take_model_step`` (wrapped, to
decide a step's fate after accumulation), ``engine._step_applied`` and
``engine._global_grad_norm`` (set as DeepSpeed itself sets them), the optimizers'
``_lazy_init_hp_params_optimizer_state`` / ``_hp_optimizer_states_linked`` and
``PipelineModule._layer_specs``; parameter attributes DeepSpeed sets: ``ds_id``, ``ds_shape``,
``ds_tensor`` (ZeRO-3), ``ds_pipe_replicated`` (tied pipeline copies). For speed (``streamline_bf16``):
``BF16_Optimizer._update_hp_grad`` (replaced on the instance), its ``fp32_groups_gradients`` /
``fp32_groups_has_gradients`` / ``autoep_folding_tp_group``, and the engine flags
``enable_backward_allreduce`` / ``pipeline_enable_backward_allreduce``. Re-check these names when DeepSpeed moves.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Optional

import torch

CHECKED_AGAINST = "deepspeed 0.19.8"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def is_pipe_replicated(p: torch.nn.Parameter) -> bool:
    """A tied pipeline parameter's copy on a stage that does not own it (DeepSpeed marks them)."""
    return bool(getattr(p, "ds_pipe_replicated", False))


def local_numel(p: torch.nn.Parameter) -> int:
    """The elements of ``p`` this rank holds (ZeRO-3 keeps only its partition in ``ds_tensor``)."""
    return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()


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


# ------------------------------------------------------------------ the optimizer step and its counters

def wrap_model_step(ds: Any, skip: Callable[[], bool]) -> None:
    """Call ``skip()`` right before each optimizer step (after accumulation, after DeepSpeed's own
    reductions); when it returns True the step is not taken and is booked as DeepSpeed books an fp16
    overflow (no update, no LR step, ``skipped_steps += 1``)."""
    original = ds._take_model_step

    def take_model_step(*args, **kwargs):
        if skip():
            _book_skipped_step(ds)
            return None
        return original(*args, **kwargs)

    ds._take_model_step = take_model_step


def _book_skipped_step(ds: Any) -> None:
    if ds.zero_optimization() or ds.fp16_enabled() or ds.bfloat16_enabled():
        ds.optimizer.zero_grad()
    else:
        ds.zero_grad()
    ds._step_applied = False
    ds.skipped_steps += 1
    ds.losses = None
    ds.global_steps += 1
    ds.global_samples += ds.train_batch_size()


def set_global_grad_norm(ds: Any, norm: float) -> None:
    """Report megalm's own gradient norm through ``get_global_grad_norm`` (as DeepSpeed's optimizers do)."""
    ds._global_grad_norm = norm


def skipped_steps(ds: Any) -> int:
    """Steps DeepSpeed did not apply (fp16 overflows and megalm's non-finite skips) since the run began."""
    return int(getattr(ds, "skipped_steps", 0))


def loss_scale(ds: Any) -> Optional[float]:
    """The fp16 loss scale now (None where the optimizer has none)."""
    opt = getattr(ds, "optimizer", None)
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
        if torch.is_tensor(value):
            return float(value.item())
    return None


def pipeline_layer_specs(module: Any) -> list:
    """The LayerSpecs a ``deepspeed.pipe.PipelineModule`` was built from, in order."""
    return module._layer_specs


# ---------------------------------------------------------------- bf16 speed, same bits
# Measured at the issue-15 shape (16.6M parameters, one CPU process): DeepSpeed's BF16_Optimizer converts
# each bf16 gradient into a freshly allocated fp32 tensor before adding it to the fp32 buffer
# (lp.grad.to(fp32) + add_: ~3.4x one mixed-dtype add_, the allocations page-faulting every step), and with
# one data-parallel rank it still flattens every fp32 gradient, all-reduces it over that rank and copies it
# back. streamline_bf16 keeps the numbers and drops both costs.

_HP_FIELDS = ("_update_hp_grad", "fp32_groups_gradients", "fp32_groups_has_gradients", "autoep_folding_tp_group")


@torch.no_grad()
def _update_hp_grad(self: Any, lp: torch.nn.Parameter, group_idx: int, param_idx: int, clear_lp_grads: bool) -> None:
    """``BF16_Optimizer._update_hp_grad`` without the temporary fp32 copy of ``lp.grad``."""
    if lp.grad is None:
        return
    if self.autoep_folding_tp_group is not None:  # expert-parallel folding corrections live in DeepSpeed's version
        return type(self)._update_hp_grad(self, lp, group_idx, param_idx, clear_lp_grads)
    hp_grad = self.fp32_groups_gradients[group_idx][param_idx]
    # fp32 += bf16 upcasts each element on the fly: the same fp32 sum as DeepSpeed's add of lp.grad.to(fp32)
    hp_grad.add_(lp.grad.view(hp_grad.shape))
    lp._hp_grad = hp_grad
    self.fp32_groups_has_gradients[group_idx][param_idx] = True
    if clear_lp_grads:
        lp.grad.zero_()


def streamline_bf16(ds: Any, dp_size: int) -> list[str]:
    """Under ``BF16_Optimizer``: one-pass fp32 gradient accumulation, and no all-reduce over one
    data-parallel rank (an identity). Bit-identical results; returns what was applied."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    opt = getattr(ds, "optimizer", None)
    if not isinstance(opt, BF16_Optimizer):
        return []
    applied = []
    if all(hasattr(opt, f) for f in _HP_FIELDS) and opt.grad_acc_dtype == torch.float32:
        opt._update_hp_grad = types.MethodType(_update_hp_grad, opt)
        applied.append("one-pass fp32 gradient accumulation")
    if dp_size == 1:
        # BF16_Optimizer's reduction is buffered_allreduce_fallback over its flat fp32 gradient buffers (no
        # side effects, unlike the fp32 path's zero-filling of missing grads): over one rank it returns its input.
        for flag in ("enable_backward_allreduce", "pipeline_enable_backward_allreduce"):
            if getattr(ds, flag, None) is True:
                setattr(ds, flag, False)
                applied.append(f"{flag}=False (one data-parallel rank)")
    return applied
