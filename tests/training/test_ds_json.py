"""The DeepSpeed JSON megalm derives for GPU-cluster correctness: fp32 gradient accumulation under bf16, and
whole stage-to-stage transfers where DeepSpeed's TP-partitioned ones would mix sequence-parallel slices."""

import json

import pytest

from megalm import config as C


@pytest.mark.parametrize("stage, ds_stage", [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_bf16_accumulates_and_reduces_in_fp32(stage, ds_stage):
    cfg = C.from_dict({"precision": "bf16", "zero": {"stage": stage}})
    ds = C.deepspeed_config(cfg, 2)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    assert ds["zero_optimization"]["stage"] == ds_stage  # DeepSpeed 0.19 has fp32 accumulation only at ZeRO >= 1
    assert "data_types" not in C.deepspeed_config(cfg.replace(precision="fp32"), 2)


@pytest.mark.parametrize("sets, whole", [
    (["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"], True),
    (["parallel.tensor=2", "parallel.pipeline=2", "objective.name=plm"], True),
    (["parallel.tensor=2", "parallel.pipeline=2"], False),  # replicated activations: partitioning is right
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], False),  # no pipeline
])
def test_sequence_parallel_slices_travel_whole_between_stages(sets, whole, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"pipeline": {"pipe_partitioned": True, "grad_partitioned": True}}))
    _, ds = C.resolve(None, sets + ["model.num_layers=4", "train.global_batch_size=8"], None, 4)
    assert ("pipeline" in ds) == whole
    if whole:  # and a user's --ds-config cannot switch the partitioned transfer back on
        _, ds = C.resolve(None, sets + ["model.num_layers=4", "train.global_batch_size=8"], str(user), 4)
        assert ds["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
