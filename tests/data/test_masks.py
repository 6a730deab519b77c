"""The compact segment representation reproduces Megatron's _get_ltor_masks_and_position_ids (written out here)."""

import numpy as np
import pytest

from megalm.data.gpt_dataset import segment_ids_from_eod
from megalm.data.masks import attention_allowed, cu_seqlens, loss_mask, position_ids


def megatron_ltor(data, eod, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Slow reference, per the spec: loop over EOD positions, dense mask."""
    n = len(data)
    att = np.tril(np.ones((n, n)))
    lm = np.ones(n, np.float32)
    if eod_mask_loss:
        lm[data == eod] = 0.0
    pos = np.arange(n)
    if reset_position_ids or reset_attention_mask:
        prev = 0
        for i in np.flatnonzero(data == eod):
            if reset_attention_mask:
                att[i + 1:, :i + 1] = 0
            if reset_position_ids:
                pos[i + 1:] -= i + 1 - prev
                prev = i + 1
    return att > 0.5, lm, pos


@pytest.mark.parametrize("seed", range(5))
def test_segments_reproduce_megatron_masks(seed):
    r = np.random.default_rng(seed)
    eod = 3
    text = r.integers(3, 8, 65)  # many EODs, including adjacent ones and one at position 0 sometimes
    seg = segment_ids_from_eod(text, eod)
    inputs, in_seg, label_seg = text[:-1], seg[:-1], seg[1:]
    att, lm, pos = megatron_ltor(inputs, eod, True, True, True)
    np.testing.assert_array_equal(position_ids(in_seg), pos)
    np.testing.assert_array_equal(attention_allowed(in_seg), att)
    np.testing.assert_array_equal(loss_mask(inputs, label_seg, eod, True), lm)
    cu = cu_seqlens(in_seg)
    assert cu[0] == 0 and cu[-1] == 64 and (np.diff(cu) > 0).all()
    np.testing.assert_array_equal(np.repeat(np.arange(len(cu) - 1), np.diff(cu)), in_seg - in_seg[0])


def test_batched_position_ids_and_padding():
    seg = np.array([[0, 0, 1, 1, 1, -1], [2, 2, 2, 3, 4, 4]])
    np.testing.assert_array_equal(position_ids(seg), [[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 0, 1]])
    np.testing.assert_array_equal(loss_mask(np.array([1, 1, 1, 1, 1]), np.array([0, 0, 1, -1, -1]), 3, False),
                                  [1, 1, 1, 0, 0])
