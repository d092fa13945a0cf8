"""Block maps on the NumPy path: the reference definition, topk_mask's map, forward's use."""

import numpy as np
import pytest

import dmattn_cupy
from dmattn_cupy._block_map import MAP_KEYS, map_strides, map_words


def _bits_by_loops(mask):
    """The map's definition, one row and tile at a time: plane 0, the tile has a kept key; plane 1,
    every key of it (the last tile: every key below Sk) is kept."""
    *lead, seqlen_k = mask.shape
    out = np.zeros((*lead, 2, map_words(seqlen_k)), dtype=np.uint32)
    for index in np.ndindex(*lead):
        for t in range(-(-seqlen_k // MAP_KEYS)):
            keep = mask[index][t * MAP_KEYS:(t + 1) * MAP_KEYS] != 0
            bit = np.uint32(1 << (t % 32))
            if keep.any():
                out[index + (0, t // 32)] |= bit
            if keep.all():
                out[index + (1, t // 32)] |= bit
    return out


@pytest.mark.parametrize("shape", [(2, 3, 4, 1), (1, 1, 3, 127), (2, 1, 1, 4097), (1, 2, 2, 9000)])
@pytest.mark.parametrize("dtype", [bool, np.uint8, np.float32, np.float64])
def test_reference_bits(shape, dtype):
    mask = (np.random.default_rng(0).random(shape) < 0.003).astype(dtype)
    mask.flat[-1] = 1  # the last, possibly partial tile
    mask[..., 0, (shape[-1] - 1) // MAP_KEYS * MAP_KEYS:] = 1  # full tiles: row 0's last (maybe short) one,
    mask[..., -1, :MAP_KEYS] = 1                              # the last row's first
    block_map = dmattn_cupy.block_map(mask)
    assert block_map.mask_shape == shape
    assert block_map.bits.dtype == np.uint32
    np.testing.assert_array_equal(block_map.bits, _bits_by_loops(mask))


def test_float_mask_zero_and_nan():
    mask = np.zeros((1, 1, 3, 256), dtype=np.float32)
    mask[0, 0, 0, 3] = -0.0
    mask[0, 0, 1, 200] = np.nan
    mask[0, 0, 2, 0] = 0.5
    assert dmattn_cupy.block_map(mask).bits[0, 0, :, 0, 0].tolist() == [0, 2, 1]


def test_tiles_and_density():
    mask = np.zeros((1, 1, 2, 300), dtype=bool)
    mask[0, 0, 0, 129] = True
    mask[0, 0, 1, 256:] = True  # the last tile's 44 keys: all of it
    block_map = dmattn_cupy.block_map(mask)
    assert block_map.tiles().tolist() == [[[[False, True, False], [False, False, True]]]]
    assert block_map.full_tiles().tolist() == [[[[False, False, False], [False, False, True]]]]
    assert block_map.density() == pytest.approx(2 / 6)


@pytest.mark.parametrize("block", [None, 64])
def test_topk_returns_the_map_of_its_mask(block):
    bias = np.random.default_rng(2).standard_normal((2, 2, 40, 700)).astype(np.float32)
    mask, block_map = dmattn_cupy.topk_mask(bias, 90, causal=True, block=block, return_block_map=True)
    np.testing.assert_array_equal(mask, dmattn_cupy.topk_mask(bias, 90, causal=True, block=block))
    np.testing.assert_array_equal(block_map.bits, _bits_by_loops(mask))


def test_forward_with_a_block_map_is_the_same_function():
    """The reference computes the exact function: a map changes nothing on the NumPy path."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 30, 4, 16))
    k, v = rng.standard_normal((2, 1, 300, 2, 16))
    mask = rng.random((1, 2, 30, 300)) < 0.1
    out = dmattn_cupy.forward(q, k, v, mask, causal=True)
    np.testing.assert_array_equal(dmattn_cupy.forward(q, k, v, mask, causal=True,
                                                      block_map=dmattn_cupy.block_map(mask)), out)


def test_backward_with_a_block_map_is_the_same_function():
    """backward takes the forward's map; on the NumPy path it changes nothing."""
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 30, 4, 16))
    k, v = rng.standard_normal((2, 1, 300, 2, 16))
    mask = rng.random((1, 2, 30, 300)) < 0.1
    bias = rng.standard_normal((1, 2, 30, 300))
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape)
    want = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, causal=True)
    got = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, causal=True,
                               block_map=dmattn_cupy.block_map(mask))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_map_strides_skip_broadcast_dims():
    assert map_strides((2, 4, 100), 3) == (2400, 600, 6)  # two planes of 3 words per row
    assert map_strides((1, 4, 1), 2) == (0, 4, 0)
    assert map_words(1) == 1 and map_words(4096) == 1 and map_words(4097) == 2
