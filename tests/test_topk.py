"""topk_mask: window selection, causal and mask interplay, block smoothing."""

import numpy as np
import pytest

import dmattn_cupy


def brute_force_topk(bias, window, causal=False, mask=None):
    """Row by row: the visible keys sorted by (-bias, key index), first `window` of them."""
    seqlen_q, seqlen_k = bias.shape[-2:]
    mask = np.ones(bias.shape, bool) if mask is None else np.broadcast_to(mask != 0, bias.shape)
    keep = np.zeros(bias.shape, bool)
    for index in np.ndindex(bias.shape[:-1]):
        i = index[-1]
        visible = [j for j in range(seqlen_k)
                   if mask[index][j] and (not causal or j <= i + seqlen_k - seqlen_q)]
        for j in sorted(visible, key=lambda j: (-bias[index][j], j))[:window]:
            keep[index + (j,)] = True
    return keep


@pytest.mark.parametrize("window", [1, 3, 7, 10])
@pytest.mark.parametrize("shape", [(2, 3, 4, 10), (1, 1, 5, 10), (2, 1, 1, 10)], ids=str)
def test_keeps_the_window_largest_entries_per_row(window, shape):
    bias = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    keep = dmattn_cupy.topk_mask(bias, window)
    assert keep.shape == bias.shape and keep.dtype == bool
    assert np.all(keep.sum(-1) == window)
    kept_min = np.where(keep, bias, np.inf).min(-1)
    dropped_max = np.where(keep, -np.inf, bias).max(-1)
    assert np.all(kept_min > dropped_max)
    np.testing.assert_array_equal(keep, brute_force_topk(bias, window))


def test_ties_go_to_the_earlier_key():
    keep = dmattn_cupy.topk_mask(np.zeros((1, 1, 2, 6)), 2)
    np.testing.assert_array_equal(keep[0, 0], [[1, 1, 0, 0, 0, 0]] * 2)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(6, 6), (4, 9), (9, 4), (1, 5)])
@pytest.mark.parametrize("window", [1, 3])
def test_causal_never_keeps_future_keys_and_short_rows_keep_all(seqlen_q, seqlen_k, window):
    bias = np.random.default_rng(1).standard_normal((2, 2, seqlen_q, seqlen_k))
    bias[..., -1] = 100.0  # the largest entry is the last key, hidden from early queries
    keep = dmattn_cupy.topk_mask(bias, window, causal=True)
    visible = np.tri(seqlen_q, seqlen_k, seqlen_k - seqlen_q, dtype=bool)
    assert not np.any(keep & ~visible)
    # Rows with fewer visible keys than the window keep exactly their visible keys.
    assert np.all(keep.sum(-1) == np.minimum(visible.sum(-1), window))
    np.testing.assert_array_equal(keep, brute_force_topk(bias, window, causal=True))


def test_masked_entries_never_count_even_with_the_largest_bias():
    rng = np.random.default_rng(2)
    bias = rng.standard_normal((2, 3, 4, 8))
    mask = rng.random((2, 1, 4, 8)) > 0.4  # broadcast over heads
    bias[..., 0] = 50.0
    mask[..., 0] = False
    keep = dmattn_cupy.topk_mask(bias, 3, mask=mask)
    assert not np.any(keep[..., 0])
    assert not np.any(keep & ~mask)
    np.testing.assert_array_equal(keep, brute_force_topk(bias, 3, mask=mask))


def test_numeric_mask_and_causal_combine():
    bias = np.random.default_rng(3).standard_normal((1, 2, 5, 5)).astype(np.float16)
    mask = np.ones((1, 1, 1, 5), np.float32)
    mask[..., 1] = 0
    keep = dmattn_cupy.topk_mask(bias, 2, causal=True, mask=mask)
    np.testing.assert_array_equal(keep, brute_force_topk(bias, 2, causal=True, mask=mask))
    assert not np.any(keep[..., 1])


def test_visible_keys_at_minus_inf_still_rank_above_hidden_keys():
    bias = np.full((1, 1, 1, 4), -np.inf)
    mask = np.array([1, 0, 1, 0], bool).reshape(1, 1, 1, 4)
    keep = dmattn_cupy.topk_mask(bias, 2, mask=mask)
    np.testing.assert_array_equal(keep[0, 0, 0], [True, False, True, False])


def test_block_smoothing_keeps_blocks_more_than_half_kept():
    # Keys 0..9 in blocks of 4: [0-3], [4-7], and the partial block [8, 9].
    bias = np.zeros((1, 1, 1, 10))
    bias[..., [0, 1, 2, 4, 5, 8, 9]] = 1.0  # top-7: 3/4 of block 0, 2/4 of block 1, 2/2 of block 2
    keep = dmattn_cupy.topk_mask(bias, 7, block=4)
    np.testing.assert_array_equal(keep[0, 0, 0].astype(int), [1, 1, 1, 1, 0, 0, 0, 0, 1, 1])


def test_last_partial_block_uses_its_own_length():
    bias = np.zeros((1, 1, 1, 9))
    bias[..., [0, 8]] = 1.0  # the last block is key 8 alone, kept: 1 of 1 > half
    keep = dmattn_cupy.topk_mask(bias, 2, block=4)
    np.testing.assert_array_equal(keep[0, 0, 0].astype(int), [0, 0, 0, 0, 0, 0, 0, 0, 1])


def test_block_of_one_changes_nothing():
    bias = np.random.default_rng(4).standard_normal((2, 2, 3, 11))
    np.testing.assert_array_equal(dmattn_cupy.topk_mask(bias, 4, block=1),
                                  dmattn_cupy.topk_mask(bias, 4))


def test_block_smoothing_never_revives_hidden_keys():
    bias = np.ones((1, 1, 4, 8))
    keep = dmattn_cupy.topk_mask(bias, 8, causal=True, block=8)
    np.testing.assert_array_equal(keep[0, 0], np.tri(4, 8, 4, dtype=bool))
    mask = np.ones((1, 1, 1, 8), bool)
    mask[..., 3] = False
    assert not np.any(dmattn_cupy.topk_mask(bias, 8, block=4, mask=mask)[..., 3])


@pytest.mark.gpu
def test_cupy_matches_numpy(cupy):
    rng = np.random.default_rng(5)
    bias = rng.standard_normal((2, 3, 17, 40)).astype(np.float32)
    mask = rng.random((2, 1, 17, 40)) > 0.2
    want = dmattn_cupy.topk_mask(bias, 9, causal=True, block=4, mask=mask)
    got = dmattn_cupy.topk_mask(cupy.asarray(bias), 9, causal=True, block=4,
                                mask=cupy.asarray(mask))
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(got), want)


def test_cuda_launch_shape_is_a_pure_function_of_sizes():
    from dmattn_cupy._cuda.topk import mask_template_args, threads_per_row
    assert threads_per_row(rows=1, seqlen_k=131072, sm_count=132) == 1024  # decode: few long rows
    assert threads_per_row(rows=32768, seqlen_k=32768, sm_count=132) == 256
    assert threads_per_row(rows=1, seqlen_k=37, sm_count=132) == 64  # no warp without keys
    assert mask_template_args(None) == (0, False)
    assert mask_template_args(np.dtype(bool)) == (1, False)
    assert mask_template_args(np.dtype(np.int64)) == (8, False)
    assert mask_template_args(np.dtype(np.float16)) == (2, True)
