"""The NumPy reference path against an independent dense float64 implementation and against
central finite differences."""

import itertools
import subprocess
import sys

import numpy as np
import pytest

import dmattn_cupy
from dmattn_cupy import _reference
from dmattn_cupy._validate import validate_attention

# ---------------------------------------------------------------------------------------------
# Independent dense implementation: full (B, H, Sq, Sk) float64 temporaries, textbook formulas.


def _per_query_head(x, heads):
    """(B|1, H|Hk|1, ...) -> (B|1, H|1, ...): a head dim of Hk is repeated like k/v."""
    if x.shape[1] in (1, heads):
        return x
    return np.repeat(x, heads // x.shape[1], axis=1)


def dense_attention(q, k, v, mask=None, bias=None, *, scale=None, causal=False, softcap=0.0,
                    dout=None):
    """out, lse and (when dout is given) dq, dk, dv, dbias by direct softmax calculus."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1 / np.sqrt(head_dim) if scale is None else scale
    k_full = np.repeat(k, group, axis=2)
    v_full = np.repeat(v, group, axis=2)

    pre = scale * np.einsum("bihd,bjhd->bhij", q, k_full)
    if bias is not None:
        pre = pre + _per_query_head(bias.astype(np.float64), heads)
    s = softcap * np.tanh(pre / softcap) if softcap > 0 else pre
    visible = np.ones(s.shape, bool)
    if mask is not None:
        visible &= _per_query_head(mask, heads) != 0
    if causal:
        visible &= np.tri(seqlen_q, seqlen_k, seqlen_k - seqlen_q, dtype=bool)
    s = np.where(visible, s, -np.inf)
    row_max = s.max(-1, keepdims=True)
    empty = ~visible.any(-1, keepdims=True)
    e = np.where(visible, np.exp(s - np.where(empty, 0, row_max)), 0)
    total = e.sum(-1, keepdims=True)
    p = np.where(empty, 0, e / np.where(empty, 1, total))
    lse = np.where(empty, -np.inf, row_max + np.log(np.where(empty, 1, total)))[..., 0]
    out = np.einsum("bhij,bjhd->bihd", p, v_full)
    if dout is None:
        return out, lse

    dout = dout.astype(np.float64)
    dp = np.einsum("bihd,bjhd->bhij", dout, v_full)
    # Softmax Jacobian: dS_ij = P_ij (dP_ij - sum_l P_il dP_il).
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    if softcap > 0:
        ds = ds * (1 - np.tanh(pre / softcap) ** 2)
    dq = scale * np.einsum("bhij,bjhd->bihd", ds, k_full)
    dk_full = scale * np.einsum("bhij,bihd->bjhd", ds, q)
    dv_full = np.einsum("bhij,bihd->bjhd", p, dout)
    dk = dk_full.reshape(batch, seqlen_k, kv_heads, group, head_dim).sum(3)
    dv = dv_full.reshape(batch, seqlen_k, kv_heads, group, head_dim).sum(3)
    dbias = None if bias is None else _reduce_to_shape(ds, bias.shape, heads)
    return out, lse, dq, dk, dv, dbias


def _reduce_to_shape(grad, shape, heads):
    """Sum a (B, H, Sq, Sk) gradient over the dims a (B|1, H|Hk|1, Sq|1, Sk) operand broadcast."""
    batch, _, seqlen_q, seqlen_k = grad.shape
    if shape[1] not in (1, heads):  # head dim Hk: sum each group of H // Hk query heads
        grad = grad.reshape(batch, shape[1], heads // shape[1], seqlen_q, seqlen_k).sum(2)
    axes = tuple(d for d in range(3) if shape[d] == 1 and grad.shape[d] > 1)
    return grad.sum(axis=axes, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Helpers


def make_inputs(seed, batch=2, seqlen_q=5, seqlen_k=7, heads=4, kv_heads=2, head_dim=8,
                mask_shape=None, bias_shape=None, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seqlen_q, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, seqlen_k, kv_heads, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, seqlen_k, kv_heads, head_dim)).astype(dtype)
    mask = None if mask_shape is None else rng.random(mask_shape) > 0.3
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    return q, k, v, mask, bias, dout


def check_against_dense(q, k, v, mask, bias, dout, *, atol=1e-10, **options):
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, return_lse=True, **options)
    grads = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, **options)
    want_out, want_lse, *want_grads = dense_attention(q, k, v, mask, bias, dout=dout, **options)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=atol)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)],
                               rtol=atol, atol=atol)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, want_grads):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)
    return out, lse, grads


def broadcast_shapes(batch, heads, kv_heads, seqlen_q, seqlen_k):
    """Every (B|1, H|Hk|1, Sq|1, Sk) combination."""
    head_options = sorted({heads, kv_heads, 1}, reverse=True)
    return [(b, h, s, seqlen_k)
            for b, h, s in itertools.product((batch, 1), head_options, (seqlen_q, 1))]


# ---------------------------------------------------------------------------------------------
# Forward and backward against the dense implementation


@pytest.mark.parametrize("kv_heads,bias_shape", [
    (kv_heads, shape) for kv_heads in (4, 2, 1) for shape in broadcast_shapes(2, 4, kv_heads, 5, 7)
], ids=str)
def test_bias_broadcast_and_gqa(kv_heads, bias_shape):
    check_against_dense(*make_inputs(0, kv_heads=kv_heads, bias_shape=bias_shape))


@pytest.mark.parametrize("mask_shape", broadcast_shapes(2, 4, 2, 5, 7), ids=str)
@pytest.mark.parametrize("mask_dtype", [bool, np.int8, np.float32])
def test_mask_broadcast_and_dtypes(mask_shape, mask_dtype):
    q, k, v, mask, bias, dout = make_inputs(1, mask_shape=mask_shape, bias_shape=(2, 4, 5, 7))
    check_against_dense(q, k, v, mask.astype(mask_dtype), bias, dout)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(5, 9), (9, 5), (1, 7), (1, 1), (67, 130),
                                               (130, 67)])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_causal_lengths(seqlen_q, seqlen_k, kv_heads):
    inputs = make_inputs(2, batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k, kv_heads=kv_heads,
                         mask_shape=(1, 4, seqlen_q, seqlen_k), bias_shape=(1, 1, 1, seqlen_k))
    check_against_dense(*inputs, causal=True)


@pytest.mark.parametrize("softcap", [0.5, 3.0])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(softcap, causal):
    q, k, v, mask, bias, dout = make_inputs(3, mask_shape=(2, 2, 5, 7), bias_shape=(1, 4, 5, 7))
    check_against_dense(q, k, v, mask, 4 * bias, dout, softcap=softcap, causal=causal)


@pytest.mark.parametrize("scale", [0.0, -0.7, 2.5])
def test_explicit_scale(scale):
    check_against_dense(*make_inputs(4, bias_shape=(2, 4, 5, 7)), scale=scale)


def test_empty_rows_give_zero_output_neg_inf_lse_and_zero_gradients():
    # Causal with Sq > Sk hides every key from the first Sq - Sk queries; the mask empties
    # one more row.
    q, k, v, mask, bias, dout = make_inputs(5, seqlen_q=9, seqlen_k=4, mask_shape=(2, 4, 9, 4),
                                            bias_shape=(2, 4, 9, 4))
    mask[:, :, 7] = False
    out, lse, (dq, dk, dv, dbias) = check_against_dense(q, k, v, mask, bias, dout, causal=True)
    empty_rows = [0, 1, 2, 3, 4, 7]
    assert np.all(out[:, empty_rows] == 0)
    assert np.all(np.isneginf(lse[:, :, empty_rows]))
    assert np.all(dq[:, empty_rows] == 0) and np.all(dbias[:, :, empty_rows] == 0)
    for array in (out, dq, dk, dv, dbias):
        assert np.all(np.isfinite(array))


def test_all_keys_masked_gives_zero_everything():
    q, k, v, _, bias, dout = make_inputs(6, bias_shape=(2, 4, 5, 7))
    mask = np.zeros((1, 1, 1, 7), bool)
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, return_lse=True)
    grads = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias)
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    for grad in grads:
        assert np.all(grad == 0)


def test_gradients_are_exactly_zero_where_hidden():
    q, k, v, mask, bias, dout = make_inputs(7, mask_shape=(2, 4, 5, 7), bias_shape=(2, 4, 5, 7))
    mask[:, :, :, 6] = False  # key 6 is hidden from every query
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, causal=True, return_lse=True)
    _, dk, dv, dbias = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, causal=True)
    hidden = ~mask | ~np.tri(5, 7, 2, dtype=bool)
    assert np.all(dbias[hidden] == 0)
    assert np.all(dk[:, 6] == 0) and np.all(dv[:, 6] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_min_value_bias_is_finite_and_matches_the_math(dtype):
    """bias = dtype min marks keys as 'masked': they get P = 0; a row whose visible keys all
    carry it gets a finite result (uniform when the scores round to one value)."""
    q, k, v, _, bias, dout = make_inputs(8, bias_shape=(2, 4, 5, 7), dtype=dtype)
    original_bias = bias.copy()
    lowest = np.finfo(dtype).min
    bias[:, :, :, 5:] = lowest  # two 'masked' keys in every row
    bias[:, :, 2] = lowest  # row 2: every key at the minimum
    out, lse = dmattn_cupy.forward(q, k, v, bias=bias, return_lse=True)
    grads = dmattn_cupy.backward(dout, q, k, v, out, lse, bias=bias)
    for array in (out, lse, *grads):
        assert np.all(np.isfinite(array))
    # Row 2: s = scale q.k + min rounds to min for every key, so P is uniform.
    uniform = np.repeat(v.mean(axis=1), 2, axis=1)  # (B, H, D): mean over keys, per kv head
    np.testing.assert_allclose(out[:, 2], uniform, rtol=1e-5, atol=1e-6)
    # Other rows: the minimum-bias keys get exactly zero weight, like a mask.
    mask = np.ones((1, 1, 1, 7), bool)
    mask[..., 5:] = False
    want = dmattn_cupy.forward(q, k, v, mask, original_bias)
    rows = [0, 1, 3, 4]
    np.testing.assert_allclose(out[:, rows], want[:, rows], rtol=1e-5, atol=1e-6)


def test_min_value_bias_gradients_match_dense_in_float64():
    q, k, v, _, bias, dout = make_inputs(9, bias_shape=(2, 4, 5, 7))
    bias[:, :, :, 5:] = np.finfo(np.float32).min  # float32 'masked' value, carried as float64
    check_against_dense(q, k, v, None, bias, dout, atol=1e-9)


def test_float16_computes_in_float32_and_returns_float16():
    q, k, v, mask, bias, dout = make_inputs(10, mask_shape=(2, 1, 5, 7), bias_shape=(1, 4, 5, 7),
                                            dtype=np.float16)
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, causal=True, return_lse=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    grads = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, causal=True)
    assert [g.dtype for g in grads] == [np.float16] * 4
    want_out, _ = dense_attention(q, k, v, mask, bias, causal=True)
    np.testing.assert_allclose(out, want_out, atol=2e-3)


def test_float32_returns_float32():
    q, k, v, _, bias, dout = make_inputs(11, bias_shape=(2, 4, 5, 7), dtype=np.float32)
    out, lse = dmattn_cupy.forward(q, k, v, bias=bias, return_lse=True)
    grads = dmattn_cupy.backward(dout, q, k, v, out, lse, bias=bias)
    assert out.dtype == lse.dtype == np.float32
    assert [g.dtype for g in grads] == [np.float32] * 4
    check_against_dense(q, k, v, None, bias, dout, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Backward against central finite differences


def _finite_difference_grad(loss, array, eps=1e-6):
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + eps
        up = loss()
        array[index] = saved - eps
        down = loss()
        array[index] = saved
        grad[index] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("bias_shape", [(1, 4, 3, 5), (1, 1, 1, 5), (1, 2, 3, 5)], ids=str)
@pytest.mark.parametrize("options", [{}, {"causal": True}, {"softcap": 1.5}], ids=str)
def test_backward_matches_finite_differences(bias_shape, options):
    q, k, v, mask, bias, dout = make_inputs(12, batch=1, seqlen_q=3, seqlen_k=5, heads=4,
                                            kv_heads=2, head_dim=3, mask_shape=(1, 1, 3, 5),
                                            bias_shape=bias_shape)
    mask[:, :, :, 0] = True  # keep each row non-empty so every entry has a gradient path

    def loss():  # L = sum(out * dout)  =>  dL/dout = dout
        return float((dmattn_cupy.forward(q, k, v, mask, bias, **options) * dout).sum())

    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, return_lse=True, **options)
    grads = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, **options)
    for name, array, grad in zip(("q", "k", "v", "bias"), (q, k, v, bias), grads):
        np.testing.assert_allclose(grad, _finite_difference_grad(loss, array), rtol=1e-6,
                                   atol=1e-8, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Query chunking


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_chunk_size_does_not_change_results(chunk_rows):
    q, k, v, mask, bias, dout = make_inputs(13, seqlen_q=11, mask_shape=(2, 1, 11, 7),
                                            bias_shape=(1, 4, 1, 7))
    problem = validate_attention(q, k, v, mask, bias, None, True, 0.0)
    out, lse = _reference.forward(q, k, v, mask, bias, problem)
    chunked_out, chunked_lse = _reference.forward(q, k, v, mask, bias, problem, chunk_rows)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(chunked_lse))
    np.testing.assert_allclose(chunked_out, out, rtol=1e-13, atol=1e-13)
    grads = _reference.backward(dout, q, k, v, out, mask, bias, problem)
    chunked = _reference.backward(dout, q, k, v, out, mask, bias, problem, chunk_rows)
    for got, want in zip(chunked, grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_chunk_size_is_honored(monkeypatch):
    seen_rows = []
    scores = _reference._scores

    def recording_scores(q_rows, *args):
        seen_rows.append(q_rows.shape[0])
        return scores(q_rows, *args)

    monkeypatch.setattr(_reference, "_scores", recording_scores)
    q, k, v, *_ = make_inputs(14, batch=1, seqlen_q=11, heads=2, kv_heads=1)
    problem = validate_attention(q, k, v, None, None, None, False, 0.0)
    _reference.forward(q, k, v, None, None, problem, chunk_rows=4)
    assert seen_rows == [4, 4, 3] * 2  # per head: rows 0-3, 4-7, 8-10

    seen_rows.clear()
    monkeypatch.setattr(_reference, "CHUNK_ELEMENTS", 3 * 7)  # default height = 21 // Sk = 3
    _reference.forward(q, k, v, None, None, problem)
    assert seen_rows == [3, 3, 3, 2] * 2


# ---------------------------------------------------------------------------------------------
# The README's first command


def test_quickstart_runs_on_numpy():
    result = subprocess.run([sys.executable, "-m", "dmattn_cupy.quickstart"], capture_output=True,
                            text=True, check=True)
    assert "all finite: True" in result.stdout
