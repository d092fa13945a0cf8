"""CUDA kernels against a float64 oracle (tests/gpu_reference.py), fresh random inputs each test.

Outputs are poisoned first: the memory pool is filled with NaN before every call, so an element
a kernel fails to write shows up as NaN. Skipped cleanly without CuPy or a GPU.
"""

from __future__ import annotations


import numpy
import pytest

cupy = pytest.importorskip("cupy")
try:
    _HAS_GPU = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # no driver / no device
    _HAS_GPU = False

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA GPU")]

import dmattn_cupy  # noqa: E402
import gpu_reference as ref  # noqa: E402
from gpu_reference import make_inputs, poison_pool, randn, rel_err  # noqa: E402

TOL = {"float16": 3e-3, "bfloat16": 2e-2}
DTYPES = ["bfloat16", "float16"]


@pytest.fixture(params=["wgmma", "sync"])
def mma_path(request, monkeypatch):
    """Runs a test on both forward kernels: Hopper warpgroup tiles (on sm_90, for D = 64 and 128)
    and the portable mma.sync tiles."""
    monkeypatch.setenv("DMATTN_CUPY_MMA", request.param)
    return request.param










def check_forward(q, k, v, mask, bias, *, causal=False, softcap=0.0, scale=None, block_map=None):
    poison_pool()
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, scale=scale, causal=causal,
                                   softcap=softcap, return_lse=True, block_map=block_map)
    want_out, want_lse = ref.forward(q, k, v, mask, bias, scale=scale, causal=causal, softcap=softcap)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == numpy.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert not bool(cupy.isnan(out).any()), "NaN (or an unwritten element) in out"
    assert not bool(cupy.isnan(lse).any()), "NaN (or an unwritten element) in lse"
    err = rel_err(out, want_out)
    assert err <= TOL[numpy.dtype(q.dtype).name], f"out relative error {err:.2e}"
    finite = cupy.isfinite(want_lse)
    assert bool((cupy.isfinite(lse) == finite).all()), "lse = -inf exactly on rows with no visible key"
    # bf16/fp32 bias below -2^126 is raised to -2^126 (kernels_cu/types.cuh, kBiasFloor) so that
    # scores stay finite in base 2: rows made only of such keys keep their softmax (uniform) and
    # report an lse at that floor instead of at -3.4e38.
    ordinary = finite & (want_lse > -1e37)
    assert bool((lse[finite & ~ordinary] <= -1e37).all())
    if bool(ordinary.any()):
        assert float(cupy.abs(lse - want_lse)[ordinary].max()) < 2e-2
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 160, 192, 256])
def test_head_dims(D, dtype, mma_path):
    q, k, v, mask, bias = make_inputs(2, 129, 200, 4, 2, D, dtype, (2, 2, 129, 200), (2, 2, 129, 200))
    check_forward(q, k, v, mask, bias, causal=True)


@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("aux_heads", ["H", "Hk", "1"])
def test_gqa_and_head_broadcast(group, aux_heads):
    Hk = 2
    H = Hk * group
    n = {"H": H, "Hk": Hk, "1": 1}[aux_heads]
    q, k, v, mask, bias = make_inputs(2, 100, 150, H, Hk, 64, "bfloat16", (2, n, 100, 150), (2, n, 100, 150))
    check_forward(q, k, v, mask, bias)


@pytest.mark.parametrize(
    "shape",
    [(2, 4, 37, 300), (1, 4, 37, 300), (2, 1, 37, 300), (2, 4, 1, 300), (1, 1, 1, 300), (1, 2, 37, 300), (2, 2, 1, 300)],
)
@pytest.mark.parametrize("which", ["mask", "bias", "both"])
@pytest.mark.parametrize("causal", [False, True])
def test_broadcast_shapes(shape, which, causal, mma_path):
    mshape = shape if which in ("mask", "both") else None
    bshape = shape if which in ("bias", "both") else None
    q, k, v, mask, bias = make_inputs(2, 37, 300, 4, 2, 64, "float16", mshape, bshape)
    check_forward(q, k, v, mask, bias, causal=causal)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 1000), (37, 129), (129, 37), (1000, 1000), (300, 64), (64, 300), (16, 5000)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_causal(Sq, Sk, causal, mma_path):
    q, k, v, mask, bias = make_inputs(1, Sq, Sk, 4, 1, 64, "bfloat16", (1, 1, Sq, Sk), (1, 1, Sq, Sk))
    check_forward(q, k, v, mask, bias, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_and_scale(dtype):
    q, k, v, mask, bias = make_inputs(2, 77, 130, 4, 4, 128, dtype, (2, 4, 77, 130), (2, 4, 77, 130))
    check_forward(q, k, v, mask, bias, softcap=5.0, scale=0.3, causal=True)


def test_float_mask_and_float32_bias():
    q, k, v, mask, bias = make_inputs(1, 70, 90, 2, 1, 64, "bfloat16", (1, 1, 70, 90), (1, 1, 70, 90),
                                      mask_dtype=numpy.float32, bias_dtype=numpy.float32)
    check_forward(q, k, v, mask, bias)
    check_forward(q, k, v, mask.astype(numpy.float16), bias)


def test_empty_rows_and_all_zero_mask():
    q, k, v, mask, bias = make_inputs(1, 64, 128, 2, 1, 64, "float16", (1, 1, 64, 128), (1, 1, 64, 128))
    mask[:, :, ::3] = False  # every third row sees nothing
    out, lse = check_forward(q, k, v, mask, bias)
    assert bool((out[:, ::3] == 0).all()) and bool(cupy.isneginf(lse[:, :, ::3]).all())
    out, lse = check_forward(q, k, v, cupy.zeros_like(mask), bias)
    assert bool((out == 0).all()) and bool(cupy.isneginf(lse).all())
    # causal with Sq > Sk: the first Sq - Sk rows see no key
    q2 = randn((1, 100, 2, 64), "float16")
    out, lse = check_forward(q2, k[:, :40], v[:, :40], None, None, causal=True)
    assert bool((out[:, :60] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_min_value_bias(dtype):
    q, k, v, mask, bias = make_inputs(1, 50, 70, 2, 1, 64, dtype, None, (1, 1, 50, 70))
    lowest = float(numpy.finfo(numpy.float16).min) if dtype == "float16" else -3.3895313892515355e38
    bias[:, :, :, ::2] = lowest
    bias[:, :, :10, :] = lowest  # rows whose every key has the minimum bias: uniform softmax
    check_forward(q, k, v, None, bias)
    b32 = bias.astype(numpy.float32)
    b32[:, :, :10, :] = numpy.finfo(numpy.float32).min
    check_forward(q, k, v, None, b32)


def test_non_contiguous_views_and_expanded_mask():
    B, S, H, D = 2, 90, 4, 64
    qkv = randn((B, S, 3, H, D), "bfloat16")
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    bias_row = randn((B, 1, 1, S), "bfloat16")
    bias = cupy.broadcast_to(bias_row, (B, H, S, S))  # zero strides, not materialized
    mask = cupy.broadcast_to(cupy.random.random((1, 1, S, S)) < 0.5, (B, H, S, S))
    check_forward(q, k, v, mask, bias, causal=True)
    # head-first (B, H, S, D) storage transposed to (B, S, H, D)
    qh = randn((B, H, S, D), "bfloat16")
    check_forward(qh.transpose(0, 2, 1, 3), k, v, mask, bias)


def test_decode_long_keys_split(mma_path):
    Sk = 70_000
    q, k, v, mask, bias = make_inputs(1, 1, Sk, 2, 1, 64, "bfloat16", (1, 1, 1, Sk), (1, 1, 1, Sk), density=0.01)
    check_forward(q, k, v, mask, bias, causal=True)
    q, k, v, _, _ = make_inputs(2, 4, 20_000, 8, 2, 128, "float16")
    check_forward(q, k, v, None, None)
    # the most splits (MAX_SPLITS) merged, a head dim whose column pairs do not divide the
    # combine's threads, mask and bias per kv head
    Sk = 131_072
    q, k, v, mask, bias = make_inputs(1, 3, Sk, 4, 2, 80, "float16", (1, 2, 1, Sk), (1, 2, 1, Sk), density=0.02)
    check_forward(q, k, v, mask, bias)


@pytest.mark.parametrize("D", [64, 128])
def test_block_mask_whole_tiles(D, mma_path):
    """Block-structured masks: a warp whose mask rows of a tile are all "keep" skips the
    per-element mask test (fwd_block.cuh, mask_rows_full); isolated hidden keys inside otherwise
    kept blocks must still be hidden; an all-ones mask takes the skip everywhere."""
    S, blk = 700, 128
    q, k, v, _, bias = make_inputs(2, S, S, 4, 2, D, "bfloat16", None, (2, 2, S, S))
    nb = -(-S // blk)
    blocks = cupy.random.random((2, 2, nb, nb)) < 0.5
    mask = cupy.repeat(cupy.repeat(blocks, blk, axis=2), blk, axis=3)[:, :, :S, :S]
    check_forward(q, k, v, mask, bias, causal=True)
    mask[:, :, 5::97, 3::61] = False  # a hidden key in some kept blocks
    check_forward(q, k, v, mask, bias, causal=True)
    check_forward(q, k, v, cupy.ones((2, 2, S, S), dtype=bool), bias)


def test_skipping_follows_the_mask(mma_path):
    """Zeroing half of the key tiles halves the tiles the kernel computes (counter), and the
    result still matches."""
    from dmattn_cupy._cuda.forward import forward as cuda_forward
    from dmattn_cupy._validate import validate_attention

    S = 1024
    q, k, v, _, bias = make_inputs(1, S, S, 2, 1, 64, "bfloat16", None, (1, 1, S, S))
    full = cupy.ones((1, 1, S, S), dtype=bool)
    half = full.copy()
    half[..., S // 2:] = False

    def visited(mask):
        counter = cupy.zeros(1, dtype=numpy.uint64)
        problem = validate_attention(q, k, v, mask, bias, None, False, 0.0)
        cuda_forward(q, k, v, mask, bias, problem, False, tiles_visited=counter)
        return int(counter.get()[0])

    n_full, n_half = visited(full), visited(half)
    assert n_full > 0 and n_half * 2 == n_full
    assert visited(cupy.zeros_like(full)) == 0
    check_forward(q, k, v, half, bias)


def _checked_wide(*args, **kw):
    """check_forward(*args, **kw) from a fresh plan cache; whether its one call ran the wide
    Hopper kernel (K/V by TMA)."""
    from dmattn_cupy._cuda.forward import _PLANS

    _PLANS.clear()
    check_forward(*args, **kw)
    (plan,) = _PLANS.values()
    return bool(plan.tma_rows)


@pytest.mark.parametrize("D,S,group", [(128, 776, 4), (112, 296, 2), (120, 1000, 2)])
def test_tma_kv_tiles(D, S, group, monkeypatch):
    """The wide Hopper forward reads K and V by TMA (kernels_cu/tma.cuh): key tiles cut by the end
    of the keys and head dims below the 128-column tile (columns TMA fills with zeros) come out
    right, causal or not, with a bias; the narrow cp.async kernel (DMATTN_CUPY_TMA=0) agrees."""
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("TMA copies run on Hopper")
    monkeypatch.setenv("DMATTN_CUPY_MMA", "wgmma")
    q, k, v, _, bias = make_inputs(2, S, S, 4, 4 // group, D, "bfloat16", None, (2, 4 // group, S, S))
    for causal in (False, True):
        assert _checked_wide(q, k, v, None, bias, causal=causal)
    monkeypatch.setenv("DMATTN_CUPY_TMA", "0")
    assert not _checked_wide(q, k, v, None, bias, causal=True)


def _hopper_wide(monkeypatch):
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the warp-specialized forward runs on Hopper")
    monkeypatch.setenv("DMATTN_CUPY_MMA", "wgmma")


def _block_mask(B, Hk, Sq, Sk, keep, rows=32, keys=128):
    """Bool (B, Hk, Sq, Sk): (rows x keys) blocks kept with probability `keep`."""
    nb = (B, Hk, -(-Sq // rows), -(-Sk // keys))
    blocks = cupy.random.random(nb) < keep
    return cupy.repeat(cupy.repeat(blocks, rows, axis=2), keys, axis=3)[:, :, :Sq, :Sk]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,Sq,Sk", [(128, 777, 784), (112, 1000, 304), (128, 300, 1008), (120, 4096, 4096)])
def test_ws_forward_masks(D, Sq, Sk, dtype, monkeypatch):
    """The warp-specialized persistent forward (fwd_ws.cu) with a mask shared by a GQA group of 4:
    scattered keys (every tile partly kept), block masks with whole query tiles empty (the
    scheduler writes those itself), hidden keys inside kept blocks, causal or not, key tiles cut
    by the end of the keys, head dims below the tile, more work items than multiprocessors. Its
    copies need 16-byte aligned mask rows (Sk a multiple of 16 here); others run narrow."""
    _hopper_wide(monkeypatch)
    q, k, v, mask, bias = make_inputs(2, Sq, Sk, 8, 2, D, dtype, (2, 2, Sq, Sk), (2, 2, Sq, Sk))
    assert _checked_wide(q, k, v, mask, bias, causal=True)
    blocks = _block_mask(2, 2, Sq, Sk, 0.3)
    blocks[:, :, 64:256] = False  # query tiles 2..7 see nothing: written by the scheduler
    out, lse = check_forward(q, k, v, blocks, bias, causal=False)
    assert bool((out[:, 64:256] == 0).all()) and bool(cupy.isneginf(lse[:, :, 64:256]).all())
    blocks[:, :, 5::97, 3::61] = False
    assert _checked_wide(q, k, v, blocks, bias, causal=True)
    assert _checked_wide(q, k, v, blocks, None, causal=True)


@pytest.mark.parametrize("D,group", [(128, 4), (64, 2), (128, 1), (96, 2)])
def test_row_block_masks(D, group, mma_path):
    """Masks whose rows keep whole 128-key blocks, different blocks per row (top-k smoothed to
    blocks, as the benchmark's gqa8k_topk): most visited tiles are partly kept, some rows keep no
    key at all; then a few single hidden keys inside kept blocks. Every forward kernel (wide,
    narrow, mma.sync, by head dim and group)."""
    B, Hk, Sq, Sk = 2, 2, 700, 1024
    q, k, v, _, bias = make_inputs(B, Sq, Sk, Hk * group, Hk, D, "bfloat16", None, (B, Hk, Sq, Sk))
    blocks = cupy.random.random((B, Hk, Sq, Sk // 128)) < 0.4
    mask = cupy.repeat(blocks, 128, axis=3)
    check_forward(q, k, v, mask, bias, causal=True)
    check_forward(q, k, v, mask, None, causal=False)
    mask[:, :, 3::50, 130::300] = False
    check_forward(q, k, v, mask, bias, causal=False)


@pytest.mark.parametrize("shape", [(2, 1, 1, 896), (1, 2, 900, 896), (2, 1, 900, 896), (2, 8, 900, 896)])
def test_ws_forward_mask_broadcast(shape, monkeypatch):
    """Masks broadcast over batch, heads or query rows (one row scanned under the tile's causal
    limit), or one per query head (one head per tile, no bias: a bias beside it does not fit),
    read through their strides by the pre-pass (one row of tile bits per distinct mask batch and
    head) and by the copies."""
    _hopper_wide(monkeypatch)
    q, k, v, mask, bias = make_inputs(2, 900, 896, 8, 2, 128, "bfloat16", shape, (2, 2, 900, 896), density=0.2)
    bias = None if shape[1] == 8 else bias
    for causal in (False, True):
        assert _checked_wide(q, k, v, mask, bias, causal=causal)


def test_ws_forward_float_masks_and_splits(monkeypatch):
    """2- and 4-byte masks, and few query tiles over many keys: the key range is split (at tiles
    that are not word boundaries of the tile bits), the persistent CTAs take (tile, split) items and
    the partials merge."""
    _hopper_wide(monkeypatch)
    q, k, v, mask, bias = make_inputs(1, 64, 9008, 8, 2, 128, "float16", (1, 2, 64, 9008), (1, 2, 64, 9008),
                                      density=0.1)
    assert _checked_wide(q, k, v, mask, bias)
    (plan,) = __import__("dmattn_cupy._cuda.forward", fromlist=["_PLANS"])._PLANS.values()
    assert plan.num_splits > 1
    assert _checked_wide(q, k, v, mask.astype(numpy.float16), bias, causal=True)
    assert _checked_wide(q, k, v, mask.astype(numpy.float32), None, causal=True)


def test_ws_forward_counts_active_tiles_and_repeats(monkeypatch):
    """The tiles the consumers compute are exactly the (32-row x 128-key) tiles with a kept,
    visible key; the work counter is left at zero, so calls repeat bit for bit."""
    from dmattn_cupy._cuda.forward import forward as cuda_forward
    from dmattn_cupy._validate import validate_attention

    _hopper_wide(monkeypatch)
    B, Hk, S = 2, 2, 2048
    q, k, v, _, bias = make_inputs(B, S, S, 8, Hk, 128, "bfloat16", None, (B, Hk, S, S))
    mask = _block_mask(B, Hk, S, S, 0.2) & (cupy.arange(S)[None, :] <= cupy.arange(S)[:, None])
    tiles = mask.reshape(B, Hk, S // 32, 32, S // 128, 128).any(axis=(3, 5))
    counter = cupy.zeros(1, dtype=numpy.uint64)
    problem = validate_attention(q, k, v, mask, bias, None, True, 0.0)
    first = cuda_forward(q, k, v, mask, bias, problem, False, tiles_visited=counter)
    assert int(counter.get()[0]) == int(tiles.sum())
    second = cuda_forward(q, k, v, mask, bias, problem, False)
    assert bool((first == second).all())
    assert _checked_wide(q, k, v, mask, bias, causal=True)


@pytest.mark.parametrize("shape", [(2, 2, 900, 896), (2, 1, 1, 896), (1, 8, 900, 896), "expanded"])
def test_ws_forward_with_block_map(shape, monkeypatch):
    """The caller's block map (dmattn_cupy.block_map, made once) in place of the call's own pass:
    the same tiles are computed (the counter), the output is right, causal or not, for masks
    broadcast over batch, heads or rows, one per query head, and expanded (zero-stride) over the
    batch; a map that visits every tile and says none is kept whole (hidden keys tested one by one)
    agrees too.
    The narrow kernels read their own mask and take the map unused."""
    from dmattn_cupy._cuda.forward import forward as cuda_forward
    from dmattn_cupy._validate import validate_attention

    _hopper_wide(monkeypatch)
    mask_shape = (1, 2, 900, 896) if shape == "expanded" else shape
    q, k, v, mask, bias = make_inputs(2, 900, 896, 8, 2, 128, "bfloat16", mask_shape, (2, 2, 900, 896),
                                      density=0.2)
    mask = _block_mask(*mask_shape, 0.3) & mask if mask_shape[2] > 1 else mask
    if shape == "expanded":
        mask = cupy.broadcast_to(mask, (2, 2, 900, 896))
    bias = None if mask.shape[1] == 8 else bias
    block_map = dmattn_cupy.block_map(mask)
    every_bits = cupy.zeros_like(block_map.bits)
    every_bits[..., 0, :] = 0xFFFFFFFF  # plane 0 ("any") set, plane 1 ("full") clear
    everything = dmattn_cupy.BlockMap(every_bits, block_map.mask_shape)
    for causal in (False, True):
        assert _checked_wide(q, k, v, mask, bias, causal=causal, block_map=block_map)
        check_forward(q, k, v, mask, bias, causal=causal, block_map=everything)
        problem = validate_attention(q, k, v, mask, bias, None, causal, 0.0)
        counts = []
        for given in (None, block_map):
            counter = cupy.zeros(1, dtype=numpy.uint64)
            cuda_forward(q, k, v, mask, bias, problem, False, given, tiles_visited=counter)
            counts.append(int(counter.get()[0]))
        assert counts[0] == counts[1] > 0
    monkeypatch.setenv("DMATTN_CUPY_TMA", "0")
    assert not _checked_wide(q, k, v, mask, bias, causal=True, block_map=block_map)


@pytest.mark.parametrize("mask_shape", [(2, 2, 900, 1008), (2, 2, 1, 1008), (2, 8, 300, 1008)])
def test_ws_forward_rows_keeping_whole_tiles(mask_shape, monkeypatch):
    """Masks whose rows keep or drop whole 128-key tiles, each row its own (as top-k smoothed to
    blocks): the block map's "full" bits let those tiles go without mask rows or a test per score,
    the softmax dropping each row's empty tiles. Rows differ inside a query tile; a short last
    tile kept whole; hidden keys sprinkled into a few rows (their tiles go back to the tested
    path); a mask broadcast over rows; one per query head (128 rows per tile); causal (diagonal
    tiles: kept whole under the causal limit in the call's own map, not in the caller's) or not;
    the caller's map and the call's own."""
    _hopper_wide(monkeypatch)
    B, Hk, mask_rows, Sk = mask_shape
    Sq = 900 if mask_rows == 1 else mask_rows
    q, k, v, _, bias = make_inputs(B, Sq, Sk, 8, 2, 128, "bfloat16", None, (B, 2, Sq, Sk))
    bias = None if Hk == 8 else bias
    for sprinkle in (False, True):
        mask = _block_mask(B, Hk, mask_rows, Sk, 0.4, rows=1)
        if sprinkle:
            mask[:, :, ::50, 7::300] = False
        tile_map = dmattn_cupy.block_map(mask)
        full = tile_map.full_tiles()
        assert bool(full.any()) and bool((tile_map.tiles() & ~full).any()) == sprinkle
        for causal in (False, True):
            assert _checked_wide(q, k, v, mask, bias, causal=causal)
            assert _checked_wide(q, k, v, mask, bias, causal=causal, block_map=tile_map)


def test_ws_forward_with_topk_block_map(monkeypatch):
    """topk_mask's own map (written beside the mask) drives the wide forward: top-k smoothed to
    128-key blocks, as the benchmark's gqa8k_topk, and plain top-k."""
    _hopper_wide(monkeypatch)
    q, k, v, _, bias = make_inputs(2, 1000, 1024, 8, 2, 128, "bfloat16", None, (2, 2, 1000, 1024))
    for block in (128, None):
        mask, block_map = dmattn_cupy.topk_mask(bias, 256, causal=True, block=block, return_block_map=True)
        assert _checked_wide(q, k, v, mask, bias, causal=True, block_map=block_map)


def test_kv_broadcast_over_batch(mma_path):
    """K and V expanded over the batch (stride 0): TMA cannot express that stride, so the Hopper
    forward runs its narrow cp.async kernel; the result is still right."""
    from dmattn_cupy._cuda.tma import bshd_tensor_map

    q, k, v, _, bias = make_inputs(3, 200, 200, 4, 2, 128, "bfloat16", None, (3, 2, 200, 200))
    k, v = (cupy.broadcast_to(x[:1], x.shape) for x in (k, v))
    assert bshd_tensor_map(k, 128) is None
    assert not _checked_wide(q, k, v, None, bias, causal=True)


def test_runs_on_current_stream():
    q, k, v, mask, bias = make_inputs(1, 256, 256, 2, 1, 64, "bfloat16", (1, 1, 256, 256), (1, 1, 256, 256))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out = dmattn_cupy.forward(q, k, v, mask, bias)
        stream.synchronize()
    want, _ = ref.forward(q, k, v, mask, bias)
    assert rel_err(out, want) <= TOL["bfloat16"]
