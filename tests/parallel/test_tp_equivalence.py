"""TP=2 and TP=4 (with and without sequence parallelism) reproduce the TP=1 model: logits, loss, every grad."""

import pytest

from tests.harness import run_ranks
from tests.parallel.tp_check import VARIANTS, compare_variant


def _all_variants(rank, world_size):
    out = {}
    for variant in VARIANTS:
        for sp in (False, True):
            out[f"{variant}/sp={sp}"] = compare_variant(variant, world_size, sp, atol=1e-5)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_single_rank(tp):
    results = run_ranks(_all_variants, tp)
    for rank, diffs in enumerate(results):
        assert len(diffs) == 2 * len(VARIANTS)
        for name, d in diffs.items():
            assert max(d.values()) < 1e-5, (rank, name, d)
