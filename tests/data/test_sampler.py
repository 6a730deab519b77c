import itertools

import pytest

from megalm.data.sampler import PretrainingSampler
from megalm.errors import DataError


def global_order(total, consumed, mbs, dp, steps):
    """What all DP ranks draw together, micro-step by micro-step (rank order inside a step)."""
    samplers = [iter(PretrainingSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
    out = []
    for _ in range(steps):
        for s in samplers:
            out.extend(next(s))
    return out


def test_ranks_take_disjoint_slices_of_contiguous_global_batches():
    total, mbs, dp = 100, 3, 4
    per_rank = [list(PretrainingSampler(total, 0, mbs, r, dp)) for r in range(dp)]
    assert all(len(p) == total // (mbs * dp) for p in per_rank)
    for step in range(len(per_rank[0])):
        merged = [i for r in range(dp) for i in per_rank[r][step]]
        assert merged == list(range(step * mbs * dp, (step + 1) * mbs * dp))


@pytest.mark.parametrize("dp_before,dp_after", [(2, 2), (2, 4), (4, 1), (3, 2)])
def test_resume_continues_exactly_under_new_dp(dp_before, dp_after):
    total, mbs = 240, 2
    s = PretrainingSampler(total, 0, mbs, 0, dp_before)
    it = iter(s)
    for _ in itertools.islice(it, 5):
        pass
    state = s.state_dict()
    assert state == {"consumed_samples": 5 * mbs * dp_before}
    resumed = global_order(total, state["consumed_samples"], mbs, dp_after, 3)
    start = state["consumed_samples"]
    assert resumed == list(range(start, start + 3 * mbs * dp_after))


def test_state_dict_roundtrip_and_len():
    s = PretrainingSampler(50, 10, 4, 1, 2)
    assert len(s) == (50 - 10) // 8
    t = PretrainingSampler(50, 0, 4, 1, 2)
    t.load_state_dict(s.state_dict())
    assert list(t) == list(PretrainingSampler(50, 10, 4, 1, 2))
    assert t.consumed_samples == 10 + len(s) * 8


def test_drop_last_false_yields_the_tail():
    batches = list(PretrainingSampler(10, 0, 2, 1, 2, drop_last=False))
    assert batches == [[2, 3], [6, 7]]
    batches0 = list(PretrainingSampler(10, 0, 2, 0, 2, drop_last=False))
    assert batches0[-1] == [8, 9]


@pytest.mark.parametrize("args", [(0, 0, 1, 0, 1), (10, 11, 1, 0, 1), (10, 0, 1, 2, 2), (10, 0, 0, 0, 1)])
def test_bad_arguments(args):
    with pytest.raises(DataError):
        PretrainingSampler(*args)
