"""Process groups (tensor, data, pipeline) and rank queries: the one place that knows the rank layout.

Layout: TP ranks are contiguous, then DP, then PP outermost, i.e. global rank
= (pp * dp_size + dp) * tp_size + tp — the order of DeepSpeed's
``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)`` (axes pipe, data, model).
Without ``initialize`` every query answers as a single rank, so the
single-process reference path needs no torch.distributed at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from megalm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Groups:
    tensor: Any
    tensor_ranks: tuple
    data: Any
    data_ranks: tuple
    pipeline: Any
    pipeline_ranks: tuple
    model: Any  # tensor x pipeline ranks sharing one data-parallel index
    model_ranks: tuple
    tp_size: int
    dp_size: int
    pp_size: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    sequence_parallel: bool = False  # activations between TP regions split along the sequence (parallel.sequence_parallel)


_GROUPS: Optional[_Groups] = None


def layout(world_size: int, tensor: int, pipeline: int) -> dict[str, list[list[int]]]:
    """All groups of each kind as rank lists (pure function: used by ``initialize`` and by tests)."""
    if tensor < 1 or pipeline < 1 or world_size % (tensor * pipeline):
        raise ConfigError(
            f"world size {world_size} must be divisible by parallel.tensor x parallel.pipeline = "
            f"{tensor} x {pipeline}"
        )
    dp = world_size // (tensor * pipeline)

    def rank(p: int, d: int, t: int) -> int:
        return (p * dp + d) * tensor + t

    return {
        "tensor": [[rank(p, d, t) for t in range(tensor)] for p in range(pipeline) for d in range(dp)],
        "data": [[rank(p, d, t) for d in range(dp)] for p in range(pipeline) for t in range(tensor)],
        "pipeline": [[rank(p, d, t) for p in range(pipeline)] for d in range(dp) for t in range(tensor)],
        "model": [[rank(p, d, t) for p in range(pipeline) for t in range(tensor)] for d in range(dp)],
    }


def initialize(tensor: int, pipeline: int = 1, sequence_parallel: bool = False) -> None:
    """Build the groups from the current torch.distributed world (every rank must call this).

    ``sequence_parallel`` is part of the layout: the model's layers read it here, as they read the TP degree.
    """
    global _GROUPS
    if not dist.is_available() or not dist.is_initialized():
        if tensor == 1 and pipeline == 1:
            _GROUPS = None
            return
        raise ConfigError("parallel.state.initialize needs torch.distributed initialised for tensor/pipeline > 1")
    world, me = dist.get_world_size(), dist.get_rank()
    groups = layout(world, tensor, pipeline)
    mine: dict[str, Any] = {}
    for kind, lists in groups.items():
        for ranks in lists:  # every rank creates every group, in the same order
            g = dist.new_group(ranks)
            if me in ranks:
                mine[kind] = (g, tuple(ranks))
    dp = world // (tensor * pipeline)
    _GROUPS = _Groups(
        tensor=mine["tensor"][0], tensor_ranks=mine["tensor"][1],
        data=mine["data"][0], data_ranks=mine["data"][1],
        pipeline=mine["pipeline"][0], pipeline_ranks=mine["pipeline"][1],
        model=mine["model"][0], model_ranks=mine["model"][1],
        tp_size=tensor, dp_size=dp, pp_size=pipeline,
        tp_rank=me % tensor, dp_rank=(me // tensor) % dp, pp_rank=me // (tensor * dp),
        sequence_parallel=sequence_parallel and tensor > 1,
    )
    log.debug("parallel state: rank %d tp %d/%d dp %d/%d pp %d/%d", me, _GROUPS.tp_rank, tensor,
              _GROUPS.dp_rank, dp, _GROUPS.pp_rank, pipeline)


def initialize_from_grid(grid: Any, sequence_parallel: Optional[bool] = None) -> None:
    """Adopt DeepSpeed's ``PipelineParallelGrid``; its TP group is the *slice* group, not the model group.

    ``sequence_parallel`` None keeps the flag of the groups this replaces.
    """
    global _GROUPS
    if sequence_parallel is None:
        sequence_parallel = _GROUPS.sequence_parallel if _GROUPS else False
    topo = grid.topology()
    me = dist.get_rank()
    coord = topo.get_coord(me)
    tp_group = grid.get_slice_parallel_group()
    dp_group = grid.get_data_parallel_group()
    pp_group = grid.get_pipe_parallel_group()
    tp_ranks = tuple(topo.filter_match(pipe=coord.pipe, data=coord.data))
    dp_ranks = tuple(topo.filter_match(pipe=coord.pipe, model=coord.model))
    pp_ranks = tuple(topo.filter_match(data=coord.data, model=coord.model))
    model_ranks = tuple(topo.filter_match(data=coord.data))
    _GROUPS = _Groups(
        tensor=tp_group, tensor_ranks=tp_ranks, data=dp_group, data_ranks=dp_ranks,
        pipeline=pp_group, pipeline_ranks=pp_ranks,
        model=grid.get_model_parallel_group(), model_ranks=model_ranks,
        tp_size=topo.get_dim("model"), dp_size=topo.get_dim("data"), pp_size=topo.get_dim("pipe"),
        tp_rank=coord.model, dp_rank=coord.data, pp_rank=coord.pipe,
        sequence_parallel=sequence_parallel and topo.get_dim("model") > 1,
    )


def is_initialized() -> bool:
    return _GROUPS is not None


def destroy() -> None:
    """Forget the groups (the process group itself belongs to whoever created it)."""
    global _GROUPS
    _GROUPS = None


def tensor_group() -> Any:
    return _GROUPS.tensor if _GROUPS else None


def tensor_rank() -> int:
    return _GROUPS.tp_rank if _GROUPS else 0


def tensor_size() -> int:
    return _GROUPS.tp_size if _GROUPS else 1


def sequence_parallel() -> bool:
    """Whether activations outside TP regions are split along the sequence over the TP ranks (TP > 1 only)."""
    return _GROUPS.sequence_parallel if _GROUPS else False


def tensor_ranks() -> tuple:
    return _GROUPS.tensor_ranks if _GROUPS else (0,)


def data_group() -> Any:
    return _GROUPS.data if _GROUPS else None


def data_rank() -> int:
    return _GROUPS.dp_rank if _GROUPS else 0


def data_size() -> int:
    return _GROUPS.dp_size if _GROUPS else 1


def data_ranks() -> tuple:
    return _GROUPS.data_ranks if _GROUPS else (0,)


def pipeline_group() -> Any:
    return _GROUPS.pipeline if _GROUPS else None


def pipeline_rank() -> int:
    return _GROUPS.pp_rank if _GROUPS else 0


def pipeline_size() -> int:
    return _GROUPS.pp_size if _GROUPS else 1


def model_group() -> Any:
    """Tensor x pipeline ranks of one data-parallel replica (what a global grad norm sums over)."""
    return _GROUPS.model if _GROUPS else None


class MPU:
    """The ``mpu`` object DeepSpeed accepts (``deepspeed.initialize(mpu=...)``, checkpointing.configure).

    ``get_model_parallel_rank/world_size`` mean the *tensor* rank/size (Megatron's
    naming), while ``get_model_parallel_group`` spans tensor x pipeline ranks: DeepSpeed
    counts replicated params only where the model-parallel rank is 0 and then
    all-reduces the norm over this group, which is right for every stage.
    """

    def get_model_parallel_rank(self) -> int:
        return tensor_rank()

    def get_model_parallel_world_size(self) -> int:
        return tensor_size()

    def get_model_parallel_group(self) -> Any:
        return model_group() if pipeline_size() > 1 else tensor_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return tensor_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return tensor_size()

    def get_tensor_model_parallel_group(self) -> Any:
        return tensor_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return tensor_ranks()[0]

    def get_slice_parallel_rank(self) -> int:
        return tensor_rank()

    def get_slice_parallel_world_size(self) -> int:
        return tensor_size()

    def get_slice_parallel_group(self) -> Any:
        return tensor_group()

    def get_data_parallel_rank(self) -> int:
        return data_rank()

    def get_data_parallel_world_size(self) -> int:
        return data_size()

    def get_data_parallel_group(self) -> Any:
        return data_group()

    def get_data_parallel_group_ranks(self) -> list:
        return list(data_ranks())

    def get_pipeline_model_parallel_rank(self) -> int:
        return pipeline_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return pipeline_size()

    def get_pipeline_model_parallel_group(self) -> Any:
        return pipeline_group()

    def get_pipe_parallel_rank(self) -> int:
        return pipeline_rank()

    def get_pipe_parallel_world_size(self) -> int:
        return pipeline_size()

    def get_pipe_parallel_group(self) -> Any:
        return pipeline_group()


def mpu() -> MPU:
    return MPU()
