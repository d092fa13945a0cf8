"""topk_mask's CUDA kernel (kernels_cu/topk.cu) against the NumPy path, bit for bit.

Each test draws fresh inputs, hands the same values to both paths (the NumPy oracle gets
cupy.asnumpy of the GPU bias and mask) and compares the bool masks exactly. The memory pool is
poisoned first, so an output byte the kernel fails to write shows up. Skipped cleanly without
CuPy or a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu  # conftest.py skips these without a CUDA device

import dmattn_cupy  # noqa: E402
from gpu_reference import poison_pool, randn  # noqa: E402

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def check(bias, window, *, causal=False, block=None, mask=None):
    """topk_mask of the CuPy `bias` (and `mask`) equals the NumPy path's on the same values."""
    poison_pool()
    got = dmattn_cupy.topk_mask(bias, window, causal=causal, block=block, mask=mask)
    want = dmattn_cupy.topk_mask(cupy.asnumpy(bias), window, causal=causal, block=block,
                                 mask=None if mask is None else cupy.asnumpy(mask))
    assert isinstance(got, cupy.ndarray) and got.dtype == cupy.bool_ and got.shape == bias.shape
    assert int(got.view(cupy.uint8).max()) <= 1, "an output byte that is not 0 or 1 (unwritten?)"
    np.testing.assert_array_equal(cupy.asnumpy(got), want)
    return got


def gpu(values, dtype):
    """A CuPy array of `dtype` from host values (-0.0, inf and NaN survive the casts; bfloat16
    goes through float32, as in gpu_reference.randn)."""
    host = np.asarray(values, dtype=np.float32 if dtype == "bfloat16" else np.float64)
    return cupy.asarray(host).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (1, 37), (37, 37), (37, 129), (129, 37),
                                               (5, 1000), (1000, 129)])
def test_matches_numpy(dtype, causal, seqlen_q, seqlen_k):
    bias = randn((2, 3, seqlen_q, seqlen_k), dtype)
    for window in sorted({1, seqlen_k // 3 + 1, seqlen_k}):
        check(bias, window, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_ties_go_to_the_earlier_key(dtype, causal):
    # Integer values: every threshold has many ties, so the earliest-key rule decides.
    values = np.random.default_rng().integers(-2, 3, (2, 2, 40, 300))
    bias = gpu(values, dtype)
    for window in (1, 7, 150, 299):
        check(bias, window, causal=causal)
    check(gpu(np.zeros((1, 1, 3, 1000)), dtype), 500)


def finite_extremes(dtype) -> list[float]:
    """The lowest, highest and smallest normal finite values of dtype."""
    if dtype == "bfloat16":  # float32 values with the low 16 bits zero
        return [float(x) for x in np.array([0xFF7F0000, 0x7F7F0000, 0x00800000], np.uint32)
                .view(np.float32)]
    info = np.finfo(dtype)
    return [float(info.min), float(info.max), float(info.tiny)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinities_extremes_signed_zeros_and_nan(dtype):
    # -inf ties with the finite minimum (bfloat16, sorted in float32: ranks below it) and above
    # hidden keys, -0.0 ties with +0.0, NaN ranks below hidden keys (NumPy sorts NaN last).
    specials = np.array([-np.inf, np.inf, np.nan, -0.0, 0.0, 1.0, -1.0] + finite_extremes(dtype))
    values = np.random.default_rng().choice(specials, (2, 2, 33, 150))
    bias = gpu(values, dtype)
    mask = cupy.asarray(np.random.default_rng().random((2, 1, 33, 150)) > 0.3)
    for window in (1, 20, 100, 150):
        check(bias, window)
        check(bias, window, causal=True, mask=mask)
        check(bias, window, causal=True, block=16, mask=mask)
    check(gpu(np.full((1, 1, 4, 64), -np.inf), dtype), 10, causal=True, mask=mask[:1, :1, :4, :64])


@pytest.mark.parametrize("mask_dtype", ["bool", "uint8", "int8", "int16", "int32", "int64",
                                        "float16", "bfloat16", "float32", "float64"])
def test_mask_dtypes(mask_dtype):
    rng = np.random.default_rng()
    bias = randn((2, 3, 20, 200), "bfloat16")
    # Nonzero = keep: negative integers and NaN keep, -0.0 hides (as mask != 0 in NumPy).
    choices = [0, 1, 2] if mask_dtype in ("bool", "uint8") else [0, 1, -1, -128]
    if mask_dtype.startswith(("float", "bfloat")):
        choices = [0.0, -0.0, 1.0, -2.5, np.nan]
    mask = gpu(rng.choice(choices, (2, 3, 20, 200)), mask_dtype)
    for window in (5, 100):
        check(bias, window, mask=mask)
        check(bias, window, causal=True, block=32, mask=mask)


@pytest.mark.parametrize("mask_shape", [(2, 3, 17, 90), (2, 1, 17, 90), (1, 3, 1, 90),
                                        (1, 1, 1, 90), (2, 1, 1, 90)], ids=str)
@pytest.mark.parametrize("bias_shape", [(2, 3, 17, 90), (1, 3, 17, 90), (2, 1, 1, 90)], ids=str)
def test_broadcast_dims_of_one(bias_shape, mask_shape):
    mask_shape = tuple(1 if b == 1 else m for b, m in zip(bias_shape, mask_shape))
    bias = randn(bias_shape, "float32")
    mask = cupy.random.random(mask_shape) > 0.4
    for causal in (False, True):
        check(bias, 11, causal=causal, mask=mask)


def test_strided_and_expanded_bias():
    base = randn((2, 40, 3, 130), "bfloat16")
    check(base.transpose(0, 2, 1, 3), 17, causal=True)              # (B, H, Sq, Sk) view
    check(base[:, ::3, :, ::-2].transpose(0, 2, 1, 3), 9)           # negative key stride
    row = randn((1, 1, 1, 500), "float16")
    check(cupy.broadcast_to(row, (2, 2, 30, 500)), 100, causal=True)  # zero strides


@pytest.mark.parametrize("block", [1, 3, 32, 128, 1000, 5000])
@pytest.mark.parametrize("causal", [False, True])
def test_block_smoothing_with_a_partial_last_block(block, causal):
    bias = randn((1, 2, 50, 1000), "bfloat16")
    mask = cupy.random.random((1, 1, 50, 1000)) > 0.5
    for window in (1, 300, 700, 1000):  # 700, 1000: short rows fill the window with hidden keys
        check(bias, window, causal=causal, block=block)
        check(bias, window, causal=causal, block=block, mask=mask)


def test_long_rows_decode():
    bias = randn((1, 2, 1, 131072), "bfloat16")
    mask = cupy.random.random((1, 1, 1, 131072)) > 0.1
    check(bias, 1024)
    check(bias, 1024, mask=mask, causal=True)
    check(bias, 2048, block=128)


def test_runs_on_the_current_stream():
    bias = randn((2, 2, 300, 700), "float16")
    want = dmattn_cupy.topk_mask(cupy.asnumpy(bias), 64, causal=True)
    cupy.cuda.Device().synchronize()  # bias is ready: the stream below does not wait for stream 0
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        got = dmattn_cupy.topk_mask(bias, 64, causal=True)
        host = cupy.asnumpy(got, stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(host, want)


def test_seed_32k_keeps_min_window_visible_without_running_out_of_memory():
    n, window = 32768, 1024
    bias = randn((1, 1, n, n), "bfloat16")
    keep = dmattn_cupy.topk_mask(bias, window, causal=True)
    visible = cupy.arange(n) + 1
    assert bool((keep.sum(axis=-1)[0, 0] == cupy.minimum(visible, window)).all())
    # A few rows in full against the NumPy path: row i of a causal square mask sees keys 0..i.
    for i in (0, 1, window - 1, window, n // 2, n - 1):
        row = cupy.asnumpy(bias[:, :, i:i + 1])
        want = dmattn_cupy.topk_mask(row, window, mask=(np.arange(n) <= i).reshape(1, 1, 1, n))
        np.testing.assert_array_equal(cupy.asnumpy(keep[:, :, i:i + 1]), want)
