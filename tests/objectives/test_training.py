"""End to end through megalm/pretrain.py on the KJV excerpt: each objective's loss falls; layouts match the
single-process reference; a user's objective class trains by ``objective.name: module:Class``."""

import math
import os

import pytest

from megalm import config as C
from megalm.errors import ConfigError
from megalm.objectives import objective_class
from tests.training.conftest import ROOT, assert_matches_reference, losses, run_pretrain

BERT = ["model.arch=bert", "model.position=learned", "model.norm=layernorm", "model.norm_position=post",
        "model.activation=gelu", "model.bias=true", "objective.name=mlm", "objective.binary_head=sop"]
PLM = ["objective.name=plm", "model.norm=layernorm", "model.activation=gelu", "model.tie_embeddings=true"]
# Short "does it learn" runs: 2 layers, hidden 64, 60 steps, no gradient accumulation.
LAYOUT = ["train.iters=6"]  # TINY otherwise: 4 layers (so PP=2 puts blocks on both stages), micro 2, global 8
LEARN = ["model.num_layers=2", "model.seq_length=64", "train.iters=60", "train.micro_batch_size=8",
         "train.log_interval=10", "optim.lr=3e-3", "optim.warmup_iters=5"]
SP_PP = "parallel.tensor=2 parallel.pipeline=2 parallel.sequence_parallel=true"


def _nproc(sets: list) -> int:
    """tensor x pipeline ranks (no data parallelism) for a list of parallel.* overrides."""
    size = dict(s.split("=") for s in sets)
    return int(size.get("parallel.tensor", 1)) * int(size.get("parallel.pipeline", 1))


def assert_falls(records, drop: float, below: float):
    got = losses(records)
    assert len(got) == 6, got
    assert got[-1] < got[0] - drop, f"loss should fall by {drop}: {got}"
    assert got[-1] < below, f"loss should end below {below}: {got}"


def test_mlm_loss_falls(bert_data, tmp_path):
    _, records, _ = run_pretrain(bert_data, tmp_path, overrides=BERT + LEARN)
    # MLM + SOP; ln(600) + ln(2) = 7.09 is chance
    assert_falls(records, drop=0.5, below=6.4)


def test_plm_loss_falls(tiny_data, tmp_path):
    _, records, _ = run_pretrain(tiny_data, tmp_path, overrides=PLM + LEARN + ["objective.plm_span_order=true"])
    assert_falls(records, drop=0.5, below=math.log(600) - 0.6)


@pytest.fixture(scope="module")
def plm_reference(tiny_data, tmp_path_factory):
    _, records, _ = run_pretrain(tiny_data, tmp_path_factory.mktemp("plm_ref"), overrides=PLM + LAYOUT)
    assert len(losses(records)) == 6
    return records


@pytest.fixture(scope="module")
def mlm_reference(bert_data, tmp_path_factory):
    _, records, _ = run_pretrain(bert_data, tmp_path_factory.mktemp("mlm_ref"), overrides=BERT + LAYOUT)
    assert len(losses(records)) == 6
    return records


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2",
                                    "parallel.tensor=2 parallel.pipeline=2", SP_PP])
def test_plm_layout_matches_reference(layout, plm_reference, tiny_data, tmp_path):
    """The query stream travels through the pipeline beside the content stream (TP x PP: unpartitioned)."""
    sets = layout.split()
    _, records, _ = run_pretrain(tiny_data, tmp_path, nproc=_nproc(sets), overrides=PLM + LAYOUT + sets)
    assert_matches_reference(layout, records, plm_reference)


@pytest.mark.slow
def test_plm_by_order_through_the_pipeline_matches_reference(plm_reference, tiny_data, tmp_path):
    """The mask-free order path (forced: at this seq_length, 32, ``auto`` takes the dense masks on CPU) at TP2 x PP2
    with SP: order_rank crosses stages in DeepSpeed's engine and the losses equal the dense-mask reference's."""
    sets = SP_PP.split()
    _, records, _ = run_pretrain(tiny_data, tmp_path, nproc=_nproc(sets),
                                 overrides=PLM + LAYOUT + sets + ["model.two_stream_attention=order"])
    assert_matches_reference(f"order {SP_PP}", records, plm_reference)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2", SP_PP])
def test_mlm_layout_matches_reference(layout, mlm_reference, bert_data, tmp_path):
    """PP=2: the tied word embedding + output bias cross stages (the bias's tied all-reduce must run on both)."""
    sets = layout.split()
    _, records, _ = run_pretrain(bert_data, tmp_path, nproc=_nproc(sets), overrides=BERT + LAYOUT + sets, timeout=240)
    assert_matches_reference(f"mlm {layout}", records, mlm_reference)


def test_user_objective_trains_by_module_and_class(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    marker = tmp_path / "marker.txt"
    name = "tests.objectives.user_objective:SkipAheadLM"
    _, records, _ = run_pretrain(tiny_data, tmp_path / "run", overrides=[
        f"objective.name={name}", "objective.options.shift=3", f"objective.options.marker={marker}",
        "model.num_layers=2", "train.iters=12", "train.log_interval=4"])
    assert marker.read_text() == "skip_ahead shift=3\n"  # one rank, one objective
    got = losses(records)
    assert len(got) == 3 and got[-1] < got[0] - 0.3, got


def test_bad_objective_names_are_config_errors():
    with pytest.raises(ConfigError, match="neither a built-in"):
        objective_class("xlnet")
    with pytest.raises(ConfigError, match="cannot import module"):
        objective_class("tests.objectives.no_such_module:X")
    with pytest.raises(ConfigError, match="not an Objective subclass"):
        objective_class("tests.objectives.user_objective:np")
    assert objective_class("tests.objectives.user_objective:SkipAheadLM").name == "skip_ahead"
    assert C.from_dict({"objective": {"name": "mlm"}}).objective.mask_prob == 0.15
