"""Build the DeepSpeed engine for a config: plain module (ZeRO 0-3) or PipelineModule (ZeRO 0-1).

megalm owns tensor parallelism (parallel.state + the model's layers); DeepSpeed
owns ZeRO, mixed precision, loss scaling, clipping, accumulation and the 1F1B
pipeline schedule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from megalm.config import Config
from megalm.objectives.base import Objective
from megalm.training import ds_state
from megalm.training.nonfinite import NonFiniteGuard, install
from megalm.training.schedule import scheduler_factory

logger = logging.getLogger(__name__)


@dataclass
class Engine:
    """The DeepSpeed engine plus what the loop needs to know about the layout."""

    ds: Any  # deepspeed.DeepSpeedEngine or deepspeed.pipe.PipelineEngine
    pipeline: bool
    dp_rank: int
    dp_size: int
    is_last_stage: bool
    is_first_stage: bool
    objective: Objective
    guard: NonFiniteGuard

    def loss(self, output: Any, targets: tuple) -> torch.Tensor:
        """The objective's loss, watched for non-finite values (see megalm.training.nonfinite)."""
        loss = self.objective.loss(output, targets)
        self.guard.observe(loss)
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if cfg.zero.offload_optimizer:
        # ZeRO-Offload steps on the CPU: DeepSpeed's vectorised CPU Adam (JIT-built once), as it requires.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    # fused: one kernel over all tensors (torch's CPU and CUDA AdamW; ~3x the default per-tensor loop on CPU);
    # torch before 2.4 has no CPU one
    try:
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def megalm_clips(cfg: Config) -> bool:
    """fp32 without ZeRO: DeepSpeed's norm is wrong under PP and not reported, so megalm clips."""
    return cfg.precision == "fp32" and cfg.zero.stage == 0


def _pipeline_module(cfg: Config, vocab_size: int, objective: Objective, guard: NonFiniteGuard, world: int):
    """The model's pipeline stages as a ``deepspeed.pipe.PipelineModule`` on megalm's TP x PP x DP grid."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megalm.build import pipeline_layers

    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))

    def loss_fn(output, targets):
        loss = objective.loss(output, targets)
        guard.observe(loss)
        return loss

    return PipelineModule(
        layers=pipeline_layers(cfg, vocab_size),
        num_stages=pp,
        topology=topo,
        loss_fn=loss_fn,
        # "uniform": the same number of Transformer blocks per stage (Megatron's split), not of
        # pipe layers — a 2-block model on 2 stages would otherwise leave the last stage only the head.
        partition_method="type:BlockPipe" if cfg.parallel.pipeline_partition == "uniform" else "parameters",
        activation_checkpoint_interval=0,  # megalm recomputes per block (apply_recompute in build_engine)
    )


def build_engine(cfg: Config, ds_config: dict, vocab_size: int, objective: Objective) -> Engine:
    """Initialise TP/PP/DP groups, build the model (or its pipeline stages) and wrap it in DeepSpeed."""
    import deepspeed
    import torch.distributed as dist

    guard = NonFiniteGuard()
    clip = cfg.optim.clip_grad if megalm_clips(cfg) else None
    if megalm_clips(cfg):
        ds_config = {**ds_config, "gradient_clipping": 0.0}

    from megalm.build import build_model
    from megalm.model.compile import apply_compile
    from megalm.model.recompute import apply_recompute
    from megalm.parallel import state

    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    world = dist.get_world_size()
    state.initialize(tp, pp, cfg.parallel.sequence_parallel)
    # Same default seed on every rank (the model builds full weights from it and takes its TP shard) and a
    # per-TP-rank tracked stream for dropout inside split regions.
    from megalm.parallel.random import model_parallel_seed

    model_parallel_seed(cfg.train.seed)
    total_iters = cfg.train.iters
    if pp > 1:
        module = _pipeline_module(cfg, vocab_size, objective, guard, world)
        apply_recompute(apply_compile(module, cfg.train.compile), cfg.train.activation_checkpointing)
        ds, *_ = deepspeed.initialize(
            model=module, optimizer=_optimizer(cfg, module), lr_scheduler=scheduler_factory(cfg.optim, total_iters),
            config=ds_config,
        )
        install(ds, guard, clip)
        ds_state.streamline_bf16(ds, state.data_size())  # bf16: cheaper fp32 gradient bookkeeping, same bits
        grid = ds.grid
        if (grid.get_slice_parallel_rank(), grid.get_data_parallel_rank(), grid.get_stage_id()) != (
                state.tensor_rank(), state.data_rank(), state.pipeline_rank()):
            raise RuntimeError("megalm's rank layout disagrees with DeepSpeed's pipeline grid (a megalm bug)")
        return Engine(ds=ds, pipeline=True, dp_rank=state.data_rank(), dp_size=state.data_size(),
                      is_first_stage=ds.is_first_stage(), is_last_stage=ds.is_last_stage(),
                      objective=objective, guard=guard)

    model = apply_compile(build_model(cfg, vocab_size), cfg.train.compile)
    ds, *_ = deepspeed.initialize(
        model=model, optimizer=_optimizer(cfg, model), lr_scheduler=scheduler_factory(cfg.optim, total_iters),
        config=ds_config, mpu=state.mpu(),
    )
    install(ds, guard, clip)
    ds_state.streamline_bf16(ds, state.data_size())  # bf16: cheaper fp32 gradient bookkeeping, same bits
    return Engine(ds=ds, pipeline=False, dp_rank=state.data_rank(), dp_size=state.data_size(),
                  is_first_stage=True, is_last_stage=True, objective=objective, guard=guard)
