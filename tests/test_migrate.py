"""docs/migrating.md's flag table: generated from megalm.migrate.FLAGS, every key a real config key."""

import os

from megalm import config as C
from megalm.migrate import FLAGS, replace_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_flag_maps_to_a_config_key():
    keys = set(C._all_keys())
    missing = [f.megalm for f in FLAGS if f.megalm not in keys]
    assert not missing, missing
    assert len({f.megatron for f in FLAGS if f.megatron}) == len([f for f in FLAGS if f.megatron])  # no duplicates


def test_the_docs_table_is_generated():
    with open(os.path.join(ROOT, "docs", "migrating.md")) as f:
        text = f.read()
    assert replace_table(text) == text, "run: python -m megalm.migrate --write docs/migrating.md"


def test_the_core_megatron_flags_are_covered():
    mapped = {f.megatron for f in FLAGS}
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--micro-batch-size",
                 "--global-batch-size", "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--data-path", "--split", "--lr", "--train-iters", "--bf16"):
        assert flag in mapped, flag
