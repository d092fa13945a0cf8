"""CUDA backward kernels against the float64 oracle (tests/gpu_reference.py backward).

The forward comes from the CUDA path (out, lse); dout is random. Outputs are poisoned first (the
memory pool is filled with NaN), so an element the kernels fail to write shows up as NaN. Skipped
cleanly without CuPy or a GPU.
"""

from __future__ import annotations

import numpy
import pytest

cupy = pytest.importorskip("cupy")
try:
    _HAS_GPU = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # noqa: BLE001  (no driver / no device)
    _HAS_GPU = False

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA GPU")]

import gpu_reference as ref
from gpu_reference import make_inputs, poison_pool, randn, rel_err

import dmattn_cupy

TOL = {"float16": 1e-2, "bfloat16": 5e-2}
DTYPES = ["bfloat16", "float16"]
NAMES = ("dq", "dk", "dv", "dbias")


@pytest.fixture(autouse=True, params=["wgmma", "sync"])
def mma_path(request, monkeypatch):
    """Every test runs on both kinds of products: Hopper warpgroup tiles (on sm_90, tile head
    dims 64 and 128, forward and backward) and the portable mma.sync tiles."""
    monkeypatch.setenv("DMATTN_CUPY_MMA", request.param)
    return request.param


def run_backward(q, k, v, mask, bias, *, causal=False, softcap=0.0, scale=None,
                 deterministic=False, dout=None):
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, scale=scale, causal=causal,
                                   softcap=softcap, return_lse=True)
    if dout is None:
        dout = randn(q.shape, q.dtype)
    poison_pool()
    grads = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, scale=scale, causal=causal,
                                 softcap=softcap, deterministic=deterministic)
    return dout, grads


def check_backward(q, k, v, mask, bias, *, causal=False, softcap=0.0, scale=None,
                   deterministic=False):
    dout, grads = run_backward(q, k, v, mask, bias, causal=causal, softcap=softcap, scale=scale,
                               deterministic=deterministic)
    want = ref.backward(dout, q, k, v, mask, bias, scale=scale, causal=causal, softcap=softcap)
    tol = TOL[numpy.dtype(q.dtype).name]
    for name, got, exp, like in zip(NAMES, grads, want, (q, k, v, bias)):
        if like is None:
            assert got is None, f"{name} must be None without bias"
            continue
        assert got.shape == like.shape and got.dtype == like.dtype, name
        assert not bool(cupy.isnan(got).any()), f"NaN (or an unwritten element) in {name}"
        err = rel_err(got, exp)
        assert err <= tol, f"{name} relative error {err:.2e}"
    return grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 192, 256])
def test_head_dims(D, dtype):
    q, k, v, mask, bias = make_inputs(2, 129, 200, 4, 2, D, dtype, (2, 2, 129, 200), (2, 2, 129, 200))
    check_backward(q, k, v, mask, bias, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_head_dims_plain(D, dtype):
    q, k, v, _, _ = make_inputs(1, 150, 170, 2, 1, D, dtype)
    check_backward(q, k, v, None, None)


@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("aux_heads", ["H", "Hk", "1"])
def test_gqa_and_head_broadcast(group, aux_heads):
    Hk = 2
    H = Hk * group
    n = {"H": H, "Hk": Hk, "1": 1}[aux_heads]
    q, k, v, mask, bias = make_inputs(2, 100, 150, H, Hk, 64, "bfloat16", (2, n, 100, 150), (2, n, 100, 150))
    check_backward(q, k, v, mask, bias)


@pytest.mark.parametrize("mask_heads,bias_heads", [("Hk", "Hk"), ("1", "Hk"), ("Hk", "H"), ("H", "Hk")])
def test_group_shares_mask_and_bias_tiles(mask_heads, bias_heads):
    """The heads of a group reuse their query tile's mask and bias tiles unless either has a head
    per query head. Block rows of the mask are empty at irregular spacing, so the query tiles a key
    tile visits skip some (the reused slot must follow the tiles visited, not the tile index)."""
    B, S, Hk, G = 1, 700, 2, 4
    H = Hk * G
    n = {"H": H, "Hk": Hk, "1": 1}
    q, k, v, mask, bias = make_inputs(B, S, S, H, Hk, 64, "bfloat16", (B, n[mask_heads], S, S),
                                      (B, n[bias_heads], S, S))
    rows = cupy.arange(S) // 64
    mask &= ~cupy.isin(rows, cupy.asarray([1, 4, 5, 7]))[:, None]
    check_backward(q, k, v, mask, bias, causal=True)


BIAS_SHAPES = [(2, 4, 37, 300), (2, 2, 37, 300), (1, 1, 37, 300), (2, 1, 1, 300), (1, 4, 1, 300),
               (2, 2, 1, 300), (1, 2, 37, 300), (2, 1, 37, 300), (1, 1, 1, 300)]


@pytest.mark.parametrize("shape", BIAS_SHAPES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bias_broadcast_shapes(shape, dtype):
    """Every dbias reduction: per query head, per kv head (group sum), one head over several kv
    heads (atomics), over rows (column sums), over batch (atomics)."""
    q, k, v, mask, bias = make_inputs(2, 37, 300, 4, 2, 64, dtype, (2, 4, 37, 300), shape)
    check_backward(q, k, v, mask, bias)


@pytest.mark.parametrize("shape", BIAS_SHAPES)
def test_bias_broadcast_shapes_causal_float32(shape):
    q, k, v, _, bias = make_inputs(2, 37, 300, 4, 2, 64, "float16", None, shape, bias_dtype=numpy.float32)
    check_backward(q, k, v, None, bias, causal=True)


@pytest.mark.parametrize(
    "shape",
    [(2, 4, 37, 300), (1, 4, 37, 300), (2, 1, 37, 300), (2, 4, 1, 300), (1, 1, 1, 300), (1, 2, 37, 300), (2, 2, 1, 300)],
)
def test_mask_broadcast_shapes(shape):
    q, k, v, mask, bias = make_inputs(2, 37, 300, 4, 2, 64, "float16", shape, (2, 4, 37, 300))
    check_backward(q, k, v, mask, bias)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 1000), (37, 129), (129, 37), (1000, 1000), (300, 64), (64, 300)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_causal(Sq, Sk, causal):
    q, k, v, mask, bias = make_inputs(1, Sq, Sk, 4, 1, 64, "bfloat16", (1, 1, Sq, Sk), (1, 1, Sq, Sk))
    check_backward(q, k, v, mask, bias, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_softcap_and_scale(dtype, D):
    q, k, v, mask, bias = make_inputs(2, 77, 130, 4, 4, D, dtype, (2, 4, 77, 130), (2, 4, 77, 130))
    check_backward(q, k, v, mask, bias, softcap=5.0, scale=0.3, causal=True)


def test_float_mask_and_float32_bias():
    q, k, v, mask, bias = make_inputs(1, 70, 90, 2, 1, 64, "bfloat16", (1, 1, 70, 90), (1, 1, 70, 90),
                                      mask_dtype=numpy.float32, bias_dtype=numpy.float32)
    check_backward(q, k, v, mask, bias)
    check_backward(q, k, v, mask.astype(numpy.float16), bias)


def test_empty_rows_and_all_zero_mask():
    q, k, v, mask, bias = make_inputs(1, 64, 128, 2, 1, 64, "float16", (1, 1, 64, 128), (1, 1, 64, 128))
    mask[:, :, ::3] = False  # every third row sees nothing
    dq, dk, dv, dbias = check_backward(q, k, v, mask, bias)
    assert bool((dq[:, ::3] == 0).all()) and bool((dbias[:, :, ::3] == 0).all())
    dq, dk, dv, dbias = run_backward(q, k, v, cupy.zeros_like(mask), bias)[1]
    for name, x in zip(NAMES, (dq, dk, dv, dbias)):
        assert bool((x == 0).all()), f"{name} must be zero when nothing is visible"
    # causal with Sq > Sk: the first Sq - Sk rows see no key
    q2 = randn((1, 100, 2, 64), "float16")
    dq, _, _, _ = check_backward(q2, k[:, :40], v[:, :40], None, None, causal=True)
    assert bool((dq[:, :60] == 0).all())


def test_hidden_positions_have_zero_dbias():
    q, k, v, mask, bias = make_inputs(2, 50, 90, 2, 2, 64, "bfloat16", (2, 2, 50, 90), (2, 2, 50, 90))
    dbias = check_backward(q, k, v, mask, bias, causal=True)[3]
    i = cupy.arange(50)[:, None]
    j = cupy.arange(90)[None, :]
    hidden = (mask == 0) | (j > i + 90 - 50)
    assert bool((dbias[hidden] == 0).all())


@pytest.mark.parametrize("bias_heads", [4, 1])
def test_skipped_tiles_get_zero_dbias(bias_heads):
    """The host does not zero dbias (the pool is poisoned with NaN): the CTAs write zeros into the
    tiles they skip. Causal with Sq < Sk (the rows above the diagonal, written by the query chunk
    that holds the diagonal), per-query-head block-sparse masks (whole 64 x 64 blocks off), one
    dbias head per query head or one for the group, key tiles cut into query chunks."""
    Sq, Sk, H = 1100, 1300, 4
    q, k, v, _, bias = make_inputs(1, Sq, Sk, H, 1, 64, "bfloat16", None, (1, bias_heads, Sq, Sk))
    blocks = cupy.random.random((1, H, (Sq + 63) // 64, (Sk + 63) // 64)) < 0.4
    mask = cupy.repeat(cupy.repeat(blocks, 64, axis=2), 64, axis=3)[:, :, :Sq, :Sk]
    mask &= cupy.random.random(mask.shape) < 0.8
    assert _chunks(q, k, mask, bias, True) > 1
    dbias = check_backward(q, k, v, mask, bias, causal=True)[3]
    i = cupy.arange(Sq)[:, None]
    j = cupy.arange(Sk)[None, :]
    hidden = (mask == 0) | (j > i + Sk - Sq)
    hidden = hidden.all(axis=1, keepdims=True) if bias_heads == 1 else hidden
    assert bool((dbias[hidden] == 0).all()) and bool((dbias[~hidden] != 0).any())


@pytest.mark.parametrize("dtype", DTYPES)
def test_min_value_bias(dtype):
    q, k, v, _, bias = make_inputs(1, 50, 70, 2, 1, 64, dtype, None, (1, 1, 50, 70))
    lowest = float(numpy.finfo(numpy.float16).min) if dtype == "float16" else -3.3895313892515355e38
    bias[:, :, :, ::2] = lowest
    check_backward(q, k, v, None, bias)
    bias[:, :, :10, :] = lowest  # rows whose every key has the minimum bias: no NaN
    _, grads = run_backward(q, k, v, None, bias)
    for name, x in zip(NAMES, grads):
        assert not bool(cupy.isnan(x).any()), name


def test_non_contiguous_views():
    B, S, H, D = 2, 90, 4, 64
    qkv = randn((B, S, 3, H, D), "bfloat16")
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    mask = cupy.broadcast_to(cupy.random.random((1, 1, S, S)) < 0.5, (B, H, S, S))
    check_backward(q, k, v, mask, None, causal=True)


@pytest.mark.parametrize("shape", [(2, 4, 300, 300), (1, 1, 300, 300), (2, 1, 1, 300), (1, 4, 300, 300)])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_deterministic_is_bitwise_repeatable(shape, D):
    q, k, v, mask, bias = make_inputs(2, 300, 300, 4, 2, D, "bfloat16", (2, 1, 300, 300), shape)
    check_deterministic(q, k, v, mask, bias)


def check_deterministic(q, k, v, mask, bias):
    """Three deterministic (causal) runs give bitwise equal gradients, and correct ones."""
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, causal=True, return_lse=True)
    dout = randn(q.shape, q.dtype)
    runs = [dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, causal=True, deterministic=True)
            for _ in range(3)]
    for name, a, b, c in zip(NAMES, *runs):
        assert bool((a.view(numpy.uint16) == b.view(numpy.uint16)).all()), name
        assert bool((a.view(numpy.uint16) == c.view(numpy.uint16)).all()), name
    want = ref.backward(dout, q, k, v, mask, bias, causal=True)
    for name, got, exp in zip(NAMES, runs[0], want):
        assert rel_err(got, exp) <= TOL["bfloat16"], name


def test_deterministic_rows_of_any_scale():
    """Deterministic dQ adds in fixed point with a scale per row (from the row's own bound): rows
    of dout ten orders of magnitude apart are each as accurate as the default mode's fp32 adds
    make them (one scale for all rows would round the small rows' sums away)."""
    q, k, v, mask, bias = make_inputs(1, 300, 300, 4, 2, 64, "bfloat16", (1, 1, 300, 300), (1, 2, 300, 300))
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, causal=True, return_lse=True)
    row_scale = 10.0 ** cupy.random.uniform(-5, 5, (1, 300, 4, 1))
    dout = (cupy.random.standard_normal(q.shape) * row_scale).astype(q.dtype)
    want = ref.backward(dout, q, k, v, mask, bias, causal=True)[0]
    # a row's own size (a row whose sums cancel, e.g. one visible key, has dq ~ 0: its dout's)
    size = cupy.maximum(cupy.linalg.norm(want, axis=-1),
                        1e-2 * cupy.linalg.norm(dout.astype(cupy.float64), axis=-1))

    def row_errors(deterministic):
        poison_pool()
        dq = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, causal=True,
                                  deterministic=deterministic)[0]
        return cupy.linalg.norm(dq.astype(cupy.float64) - want, axis=-1) / size

    fixed, fp32 = row_errors(True), row_errors(False)
    # at most a bf16 rounding step (2^-8) more than the default's error, in every row
    excess = float((fixed - fp32).max())
    assert excess <= 2.0 ** -8, f"fixed-point dq: a row {excess:.2e} less accurate than fp32 adds"


def _chunks(q, k, mask, bias, causal):
    """How many query chunks bwd_config cuts the longest key tile into on this GPU."""
    from dmattn_cupy._cuda.bwd_config import bwd_config
    from dmattn_cupy._cuda.device import current

    B, Sq, H, D = q.shape
    cfg = bwd_config(head_dim=D, batch=B, heads=H, kv_heads=k.shape[2], seqlen_q=Sq,
                     seqlen_k=k.shape[1], mask_bytes=mask.dtype.itemsize, bias_bytes=bias.dtype.itemsize,
                     bias_rows_reduced=bias.shape[2] == 1, dbias_atomic=False, dbias_sharers=1,
                     causal=causal, sm_count=current()[1])
    return cfg.chunks


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D,S", [(64, 1100), (128, 700)])
def test_chunked_key_tiles(D, S, causal):
    """One kv head: every key tile's query range is cut into chunks whose fp32 dK, dV partials
    the last chunk sums; per-query-head mask (GQA) and a per-kv-head bias (group sums)."""
    q, k, v, mask, bias = make_inputs(1, S, S, 4, 1, D, "bfloat16", (1, 4, S, S), (1, 1, S, S))
    assert _chunks(q, k, mask, bias, causal) > 1
    check_backward(q, k, v, mask, bias, causal=causal)


@pytest.mark.parametrize("D,S", [(64, 1100), (128, 700)])
def test_deterministic_chunked_is_bitwise_repeatable(D, S):
    q, k, v, mask, bias = make_inputs(1, S, S, 4, 1, D, "bfloat16", (1, 1, S, S), (1, 1, S, S), density=0.3)
    assert _chunks(q, k, mask, bias, True) > 1
    check_deterministic(q, k, v, mask, bias)


def test_skipping_follows_the_mask():
    """Zeroing half of the query rows halves the (query tile x head) steps the backward computes,
    and the gradients still match (64-row query tiles at D = 64: rows 512.. are whole tiles; the
    key tiles are cut into query chunks here, which the count does not see)."""
    from dmattn_cupy._cuda.backward import backward as cuda_backward
    from dmattn_cupy._validate import validate_attention

    S = 1024
    q, k, v, _, bias = make_inputs(1, S, S, 2, 1, 64, "bfloat16", None, (1, 1, S, S))
    full = cupy.ones((1, 1, S, S), dtype=bool)
    half = full.copy()
    half[:, :, S // 2:] = False
    dout = randn(q.shape, q.dtype)

    def visited(mask):
        out, lse = dmattn_cupy.forward(q, k, v, mask, bias, return_lse=True)
        counter = cupy.zeros(1, dtype=numpy.uint64)
        problem = validate_attention(q, k, v, mask, bias, None, False, 0.0)
        cuda_backward(dout, q, k, v, out, lse, mask, bias, problem, False, tiles_visited=counter)
        return int(counter.get()[0])

    n_full, n_half = visited(full), visited(half)
    assert n_full > 0 and n_half * 2 == n_full
    assert visited(cupy.zeros_like(full)) == 0
    check_backward(q, k, v, half, bias)


def _block_mask(shape, seqlen_q, seqlen_k):
    """Whole 128-key tiles kept per 16-row block (some rows' tiles empty, others full), holes
    sprinkled in: tiles empty, partial and full for a row, in the given (B|1, H|1, Sq|1, Sk) shape."""
    rows = shape[2]
    blocks = cupy.random.random((*shape[:2], -(-rows // 16), -(-seqlen_k // 128))) < 0.4
    mask = blocks.repeat(16, axis=2).repeat(128, axis=3)[:, :, :rows, :seqlen_k]
    return mask & (cupy.random.random(mask.shape) < 0.9)


@pytest.mark.parametrize("B,Sq,Sk,H,Hk,D,mask_shape,causal", [
    (2, 300, 300, 4, 2, 64, (2, 2, 300, 300), True),       # a mask head per kv head
    (2, 300, 300, 4, 2, 128, (2, 4, 300, 300), False),     # per query head: a bit slot per head
    (1, 200, 700, 4, 2, 128, (1, 1, 200, 700), True),      # Sq < Sk, one mask for every head
    (2, 300, 300, 4, 2, 256, (2, 1, 300, 300), True),      # 16-row query tiles, 64-key key tiles
    (2, 129, 500, 4, 2, 96, (2, 2, 1, 500), False),        # one mask row: a map row for all
    (1, 1100, 1100, 4, 1, 64, (1, 4, 1100, 1100), True),   # key tiles cut into query chunks
])
def test_block_map_finds_the_same_query_tiles(B, Sq, Sk, H, Hk, D, mask_shape, causal):
    """backward(..., block_map=) reads the map's bits of each key tile instead of the mask's
    column: the deterministic gradients equal those of the mask's own scan and are right against
    float64, and the steps computed are the scan's (the map counts whole 128-key tiles and keys
    hidden by causality, so a 64-key tile or a causal call may add tiles whose probabilities are
    all zero, never drop one)."""
    from dmattn_cupy._cuda.backward import backward as cuda_backward
    from dmattn_cupy._validate import validate_attention

    q, k, v, _, bias = make_inputs(B, Sq, Sk, H, Hk, D, "bfloat16", None, (B, Hk, Sq, Sk))
    mask = _block_mask(mask_shape, Sq, Sk)
    block_map = dmattn_cupy.block_map(mask)
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, causal=causal, return_lse=True)
    dout = randn(q.shape, q.dtype)
    problem = validate_attention(q, k, v, mask, bias, None, causal, 0.0)

    def run(bm):
        counter = cupy.zeros(1, dtype=numpy.uint64)
        poison_pool()
        grads = cuda_backward(dout, q, k, v, out, lse, mask, bias, problem, True, bm, tiles_visited=counter)
        return grads, int(counter.get()[0])

    (grads, steps), (plain, plain_steps) = run(block_map), run(None)
    for name, a, b in zip(NAMES, grads, plain):  # values: an added tile's dbias zeros may be -0
        assert bool((a == b).all()), name
    exact = D <= 128 and not causal
    assert steps == plain_steps if exact else plain_steps <= steps, (steps, plain_steps)
    want = ref.backward(dout, q, k, v, mask, bias, causal=causal)
    for name, got, exp in zip(NAMES, grads, want):
        assert rel_err(got, exp) <= TOL["bfloat16"], name


def test_runs_on_current_stream():
    q, k, v, mask, bias = make_inputs(1, 256, 256, 2, 1, 64, "bfloat16", (1, 1, 256, 256), (1, 1, 256, 256))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out, lse = dmattn_cupy.forward(q, k, v, mask, bias, return_lse=True)
        dout = randn(q.shape, q.dtype)
        grads = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias)
        stream.synchronize()
    want = ref.backward(dout, q, k, v, mask, bias)
    for name, got, exp in zip(NAMES, grads, want):
        assert rel_err(got, exp) <= TOL["bfloat16"], name
