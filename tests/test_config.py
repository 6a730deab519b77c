"""Config loading, overrides, validation rules and the derived DeepSpeed JSON."""

import json
import os
import subprocess
import sys

import pytest

from megalm import config as C
from megalm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ["gpt_tiny", "gpt_125m", "gpt_1b", "bert_base", "plm_base", "bert_tiny", "plm_tiny"]


def load(*overrides, path=None):
    return C.load(path, list(overrides))


def test_defaults_load():
    cfg = load()
    assert cfg.precision == "fp32" and cfg.parallel.tensor == 1


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = C.load(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert cfg.model.num_layers >= 1


def test_gpt_1b_is_about_1_3b_params():
    m = C.load(os.path.join(ROOT, "configs", "gpt_1b.yaml")).model
    h, f, v = m.hidden_size, m.ffn_size, m.vocab_size
    per_layer = 4 * h * h + 3 * h * f + 2 * h
    total = m.num_layers * per_layer + 2 * v * h + h
    assert 1.2e9 < total < 1.5e9
    assert (m.num_layers, h, m.num_heads, m.seq_length) == (24, 2048, 16, 2048)
    assert (m.position, m.norm, m.activation) == ("rope", "rmsnorm", "swiglu")


@pytest.mark.parametrize("ds", sorted(os.listdir(os.path.join(ROOT, "configs", "ds"))))
def test_ds_presets_fold(ds):
    cfg, out = C.resolve(os.path.join(ROOT, "configs", "gpt_tiny.yaml"), [], os.path.join(ROOT, "configs", "ds", ds), 2)
    assert out["train_batch_size"] == cfg.train.global_batch_size
    assert out["zero_optimization"]["stage"] == cfg.zero.stage


def test_stable_public_keys_exist():
    keys = set(C._all_keys())
    for key in ["parallel.tensor", "parallel.pipeline", "zero.stage", "precision", "objective.name",
                "train.iters", "train.micro_batch_size", "train.global_batch_size", "train.seed",
                "train.log_interval", "train.eval_interval", "data.prefix", "data.tokenizer", "run.dir",
                "checkpoint.interval", "model.hidden_dropout", "model.attention_dropout"]:
        assert key in keys, key


def test_overrides_are_typed():
    cfg = load("model.num_layers=6", "optim.lr=1e-4", "parallel.sequence_parallel=true",
               "data.prefix=[0.3, a, 0.7, b]", "train.exit_duration_minutes=null")
    assert cfg.model.num_layers == 6
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.parallel.sequence_parallel is True
    assert cfg.data.prefix == [0.3, "a", 0.7, "b"]


def test_extends_merges_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  num_layers: 3\n  hidden_size: 64\ntrain:\n  iters: 5\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel:\n  num_layers: 4\n")
    cfg = C.load(str(tmp_path / "child.yaml"))
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.iters) == (4, 64, 5)


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        C.load(str(tmp_path / "a.yaml"))


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"model\.num_layer'.*did you mean model\.num_layers\?"):
        load("model.num_layer=3")


def test_unknown_key_in_wrong_section_suggests_right_one():
    with pytest.raises(ConfigError, match="did you mean train.micro_batch_size"):
        load("model.micro_batch_size=3")


def test_unknown_key_in_file_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  itres: 3\n")
    with pytest.raises(ConfigError, match=r"train\.itres.*bad\.yaml.*did you mean train\.iters"):
        C.load(str(p))


@pytest.mark.parametrize("item,match", [
    ("model.num_layers=abc", "model.num_layers' must be int"),
    ("model.num_layers=2.5", "model.num_layers' must be int"),
    ("optim.lr=fast", "optim.lr' must be float"),
    ("model.bias=3", "model.bias' must be bool"),
    ("precision=fp8", "precision' must be one of fp32, bf16, fp16"),
])
def test_wrong_type(item, match):
    with pytest.raises(ConfigError, match=match):
        load(item)


def test_hidden_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"hidden_size \(100\) must be divisible by model.num_heads \(8\)"):
        load("model.hidden_size=100", "model.num_heads=8")


def test_heads_divisible_by_tensor():
    with pytest.raises(ConfigError, match=r"num_heads \(6\) must be divisible by parallel.tensor \(4\)"):
        load("model.hidden_size=96", "model.num_heads=6", "parallel.tensor=4")


def test_layers_divisible_by_pipeline():
    with pytest.raises(ConfigError, match=r"num_layers \(3\) must be divisible by parallel.pipeline \(2\)"):
        load("model.num_layers=3", "parallel.pipeline=2")


def test_world_divisible_by_tp_pp():
    cfg = load("parallel.tensor=2", "parallel.pipeline=2")
    with pytest.raises(ConfigError, match=r"world size 6 must be divisible by .* = 4"):
        C.validate(cfg, world_size=6)


def test_global_batch_divisible_by_micro_times_dp():
    cfg = load("train.micro_batch_size=4", "train.global_batch_size=8")
    C.validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"global_batch_size \(8\) must be divisible by .* 4 x 4 = 16"):
        C.validate(cfg, world_size=4)


def test_fp16_and_bf16_together(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"fp16": {"enabled": True}, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled are both true"):
        C.resolve(None, [], str(ds), 1)


def test_zero23_with_pipeline_suggests_zero1():
    for stage in (2, 3):
        with pytest.raises(ConfigError, match=r"DeepSpeed refuses ZeRO-2/3 with pipeline.*zero.stage=1"):
            load(f"zero.stage={stage}", "parallel.pipeline=2")
    load("zero.stage=1", "parallel.pipeline=2")


def test_ds_config_conflict_names_both(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"ds.json sets stage=3 but --set zero.stage=1 says otherwise; write --set zero.stage=3"):
        C.resolve(None, ["zero.stage=1"], str(ds), 1)
    cfg, out = C.resolve(None, [], str(ds), 1)  # not written by the user: adopted
    assert cfg.zero.stage == 3 and out["zero_optimization"]["stage"] == 3


def test_ds_config_bad_json_names_line(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{\n  "train_batch_size": 8,\n}\n')
    with pytest.raises(ConfigError, match=r"ds.json is not valid JSON: line 3"):
        C.resolve(None, [], str(ds), 1)


def test_derived_deepspeed_json():
    cfg = load("train.micro_batch_size=2", "train.global_batch_size=16", "precision=bf16",
               "zero.stage=2", "optim.clip_grad=0.5", "parallel.tensor=2")
    ds = C.deepspeed_config(cfg, world_size=8)
    assert ds["gradient_accumulation_steps"] == 2  # 16 / (2 x dp 4)
    assert ds["gradient_clipping"] == 0.5  # always explicit: DeepSpeed's default is 1.0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2


def test_config_show_cli():
    out = subprocess.run([sys.executable, "-m", "megalm.cli", "config", "show",
                          os.path.join(ROOT, "configs", "gpt_tiny.yaml"), "--set", "zero.stage=1"],
                         capture_output=True, text=True, check=True).stdout
    assert "# DeepSpeed config" in out and '"stage": 1' in out


def test_cli_error_is_one_line_no_traceback():
    p = subprocess.run([sys.executable, "-m", "megalm.cli", "config", "show", "--set", "model.num_layer=2"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert "did you mean model.num_layers" in p.stderr and "Traceback" not in p.stderr


def test_import_is_light():
    code = "import time,sys; t=time.time(); import megalm, megalm.config, megalm.cli; " \
           "print(time.time()-t); print('deepspeed' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 2.0
    assert out[1:] == ["False", "False"]


def test_cli_version_and_help():
    out = subprocess.run([sys.executable, "-m", "megalm.cli", "--version"], capture_output=True, text=True).stdout
    assert out.startswith("megalm ")
    help_text = subprocess.run([sys.executable, "-m", "megalm.cli", "--help"], capture_output=True, text=True).stdout
    assert "config" in help_text


def test_readme_config_reference_is_generated():
    from megalm.config_cli import replace_reference

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert replace_reference(text, C.reference_table()) == text, \
        "README's config reference is stale: run `megalm config reference --write README.md`"


def test_ds_preset_keys_win_over_the_model_preset():
    """gpt_1b.yaml says zero.stage 1 and bf16; zero3_bf16.json's stage 3 wins (the YAML is a preset
    default, not a --set), so every DeepSpeed preset composes with every model preset."""
    cfg, out = C.resolve(os.path.join(ROOT, "configs", "gpt_1b.yaml"), [],
                         os.path.join(ROOT, "configs", "ds", "zero3_bf16.json"), 8)
    assert cfg.zero.stage == 3 and out["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match=r"write --set zero.reduce_bucket_size=500000000 \(or drop that --set\)"):
        C.resolve(os.path.join(ROOT, "configs", "gpt_1b.yaml"), ["zero.reduce_bucket_size=1000"],
                  os.path.join(ROOT, "configs", "ds", "zero2_bf16.json"), 8)
    # a --set of a key the JSON leaves alone reaches DeepSpeed (derived values win in the merged JSON)
    cfg, out = C.resolve(os.path.join(ROOT, "configs", "gpt_1b.yaml"), ["zero.overlap_comm=true"],
                         os.path.join(ROOT, "configs", "ds", "zero1_bf16.json"), 8)
    assert cfg.zero.overlap_comm and out["zero_optimization"]["overlap_comm"] is True
    assert out["zero_optimization"]["reduce_bucket_size"] == 500000000 == cfg.zero.reduce_bucket_size


def _fields(cls=C.Config, prefix=""):
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _fields(hint, prefix + f.name + ".")
        else:
            yield prefix + f.name, hint, f


@pytest.mark.parametrize("item,match", [
    ("model.norm=layer_norm", r"'model.norm' must be one of layernorm, rmsnorm; got 'layer_norm' "
                              r"\(did you mean layernorm\?\)"),
    ("model.position=rotary", r"'model.position' must be one of learned, sinusoidal, rope, alibi; got 'rotary'"),
    ("zero.stage=4", r"'zero.stage' must be one of 0, 1, 2, 3; got 4"),
    ("zero.stage=true", r"'zero.stage' must be one of 0, 1, 2, 3; got True"),  # True == 1, but not a stage
    ("run.wandb.mode=disabled", r"'run.wandb.mode' must be one of auto, online, offline"),
])
def test_choice_errors_name_key_value_and_choices(item, match):
    with pytest.raises(ConfigError, match=match):
        load(item)


def test_every_literal_choice_loads_and_is_in_the_reference():
    import typing

    table = C.reference_table()
    for key, hint, _ in _fields():
        if typing.get_origin(hint) is typing.Literal:
            choices = typing.get_args(hint)
            cell = " \\| ".join(map(str, choices))
            assert f"| `{key}` | {cell} |" in table
            if key == "precision":  # fp16 is refused on CPU later, but the loader takes it
                choices = ("fp32", "bf16")
            for value in choices:
                assert load(f"{key}={json.dumps(value)}") is not None


def test_every_key_has_help_for_the_reference():
    missing = [key for key, _, f in _fields() if not f.metadata.get("help")]
    assert not missing, f"give these config fields _doc(default, help): {missing}"


def test_choice_error_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  norm: batchnorm\n")
    with pytest.raises(ConfigError, match=r"'model.norm' \(in .*bad\.yaml\) must be one of layernorm, rmsnorm"):
        C.load(str(p))
