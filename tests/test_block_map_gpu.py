"""Block maps on the GPU (kernels_cu/block_map.cu, and topk.cu's map) against the reference
definition (dmattn_cupy._block_map.reference_bits, run here on CuPy arrays). Maps are compared bit
for bit; the output buffers are poisoned first, so a word the kernel fails to write shows."""

from __future__ import annotations

import numpy
import pytest

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu  # conftest.py skips these without a CUDA device

import dmattn_cupy  # noqa: E402
from dmattn_cupy._block_map import reference_bits  # noqa: E402
from gpu_reference import poison_pool, randn  # noqa: E402


def _sparse(shape, density, dtype=bool):
    """A mask with isolated kept keys (most 128-key tiles of a row empty at low density)."""
    return (cupy.random.random(shape) < density).astype(dtype)


def _check(mask):
    poison_pool()
    block_map = dmattn_cupy.block_map(mask)
    assert block_map.mask_shape == tuple(mask.shape)
    assert block_map.bits.dtype == numpy.uint32
    want = reference_bits(mask, cupy)
    assert block_map.bits.shape == want.shape
    assert bool((block_map.bits == want).all()), "block map differs from the reference"
    return block_map


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int8", "float16", "bfloat16", "float32", "float64", "int32"])
@pytest.mark.parametrize("seqlen_k", [1, 100, 128, 300, 4096, 4101, 9000])
def test_dtypes_and_lengths(dtype, seqlen_k):
    """Every mask dtype (1/2/4-byte native ones by 16-byte chunks where rows align, the others
    converted), key lengths that are not multiples of a tile, a chunk or a 32-tile word."""
    _check(_sparse((2, 3, 37, seqlen_k), 0.002, dtype))


def test_float_masks_keep_nonzero():
    """-0.0 hides and NaN keeps, as mask != 0 in forward."""
    for dtype in (cupy.float16, cupy.float32):
        mask = cupy.zeros((1, 1, 4, 1024), dtype=dtype)
        mask[0, 0, 0, 5] = -0.0
        mask[0, 0, 1, 300] = numpy.nan
        mask[0, 0, 2, 1023] = -2.0
        bits = _check(mask).bits.get()
        assert bits[0, 0, :, 0, 0].tolist() == [0, 1 << 2, 1 << 7, 0]


@pytest.mark.parametrize("shape", [(2, 1, 1, 896), (1, 2, 50, 896), (2, 8, 1, 4096)])
def test_broadcast_dims(shape):
    """A map has the mask's own dims: one row where the mask broadcasts."""
    _check(_sparse(shape, 0.01))


def test_views_read_in_place():
    """Non-contiguous views (every other key: element reads), unaligned rows (a one-key offset),
    and a mask expanded over batch (zero stride) give the reference bits."""
    base = _sparse((2, 2, 40, 2048), 0.003)
    _check(base[..., ::2])
    _check(base[..., 1:])
    _check(base[:, :, 3:30])
    _check(cupy.broadcast_to(base[:1], base.shape))


def test_dense_and_empty():
    full = cupy.ones((1, 2, 64, 5000), dtype=bool)
    assert _check(full).density() == 1.0
    assert bool(_check(full).full_tiles().all())
    assert _check(cupy.zeros_like(full)).density() == 0.0


@pytest.mark.parametrize("dtype", ["bool", "float16", "float32", "int32"])
def test_full_tiles(dtype):
    """The "full" plane: tiles kept whole next to tiles with one key dropped at either end or in
    the middle, a short last tile kept whole, for chunked and element-wise reads."""
    mask = cupy.ones((1, 2, 6, 4101), dtype=dtype)
    mask[0, 0, 1, 128] = 0
    mask[0, 0, 2, 255] = 0
    mask[0, 1, 3, 4000] = 0
    mask[0, 1, 4, 4100] = 0
    mask[0, 1, 5, :128] = 0
    full = _check(mask).full_tiles().get()
    assert int((~full).sum()) == 5 and not full[0, 1, 5, 0]  # the last one: no kept key at all
    _check(mask[..., 1:])  # unaligned rows: element-wise


@pytest.mark.parametrize("block", [None, 128, 48])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 300, 1000), (1, 2, 1, 65536)])
def test_topk_writes_its_map(shape, causal, block):
    """topk_mask(..., return_block_map=True): the same mask as without, and its map (gathered by
    ballots as the kernel writes the mask: blocks straddling tiles, short last blocks, few long
    rows on 1024-thread CTAs) is block_map(mask) bit for bit."""
    bias = randn(shape, "bfloat16")
    poison_pool()
    mask, block_map = dmattn_cupy.topk_mask(bias, 200, causal=causal, block=block, return_block_map=True)
    assert bool((mask == dmattn_cupy.topk_mask(bias, 200, causal=causal, block=block)).all())
    assert block_map.mask_shape == shape
    assert bool((block_map.bits == reference_bits(mask, cupy)).all())


def test_forward_checks_the_map_module():
    """A NumPy map with CuPy inputs is a TypeError naming block_map.bits."""
    q = randn((1, 64, 2, 64), "bfloat16")
    mask = _sparse((1, 2, 64, 64), 0.5)
    host_map = dmattn_cupy.block_map(mask.get())
    with pytest.raises(TypeError, match="block_map.bits"):
        dmattn_cupy.forward(q, q, q, mask, block_map=host_map)
