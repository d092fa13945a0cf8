"""Every input check of the public API: each error names the argument at fault."""

import sys
import types

import numpy as np
import pytest

import dmattn_cupy
from dmattn_cupy._validate import validate_gpu_backward_inputs, validate_gpu_inputs

B, SQ, SK, H, HK, D = 2, 5, 7, 4, 2, 8


def inputs(dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, SQ, H, D)).astype(dtype)
    k = rng.standard_normal((B, SK, HK, D)).astype(dtype)
    v = rng.standard_normal((B, SK, HK, D)).astype(dtype)
    return q, k, v


def forward_error(error, match, **changes):
    """Call forward with `changes` applied to valid defaults and expect `error` naming `match`."""
    q, k, v = inputs()
    call = {"q": q, "k": k, "v": v, "mask": None, "bias": None} | changes
    positional = [call.pop(name) for name in ("q", "k", "v", "mask", "bias")]
    with pytest.raises(error, match=match):
        dmattn_cupy.forward(*positional, **call)


# ---------------------------------------------------------------------------------------------
# q, k, v


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_wrong_rank(name):
    forward_error(ValueError, rf"^{name} must have 4 dims", **{name: np.zeros((2, 5, 8))})


def test_batch_mismatch():
    forward_error(ValueError, r"^k must have shape .*\(2, 7, 2, 8\); got \(1, 7, 2, 8\)",
                  k=np.zeros((1, SK, HK, D), np.float32))


def test_head_dim_mismatch():
    forward_error(ValueError, r"^k must have shape", k=np.zeros((B, SK, HK, 16), np.float32))


def test_v_differs_from_k():
    forward_error(ValueError, r"^v must have shape .*k's shape.*got \(2, 6, 2, 8\)",
                  v=np.zeros((B, SK - 1, HK, D), np.float32))


def test_heads_not_a_multiple_of_kv_heads():
    forward_error(ValueError, r"^q heads \(4\) must be a multiple of k/v heads \(3\)",
                  k=np.zeros((B, SK, 3, D), np.float32), v=np.zeros((B, SK, 3, D), np.float32))


def test_empty_dims():
    forward_error(ValueError, r"^q and k must have no empty dims",
                  q=np.zeros((B, 0, H, D), np.float32))


def test_integer_q():
    forward_error(TypeError, r"^q must have a floating dtype; got dtype int32",
                  q=np.zeros((B, SQ, H, D), np.int32))


def test_mixed_qkv_dtypes():
    forward_error(TypeError, r"^q, k, v must share one dtype; got q float32, k float64",
                  k=np.zeros((B, SK, HK, D)))


def test_not_an_array():
    forward_error(TypeError, r"^q must be a numpy.ndarray or a cupy.ndarray; got list",
                  q=[[1.0]])


# ---------------------------------------------------------------------------------------------
# mask and bias


@pytest.mark.parametrize("name", ["mask", "bias"])
def test_mask_bias_wrong_rank(name):
    forward_error(ValueError, rf"^{name} must have 4 dims", **{name: np.zeros((SQ, SK))})


@pytest.mark.parametrize("name", ["mask", "bias"])
@pytest.mark.parametrize("shape,dim", [((3, H, SQ, SK), 0), ((B, 3, SQ, SK), 1),
                                       ((B, H, 4, SK), 2), ((B, H, SQ, 6), 3),
                                       ((B, H, SQ, 1), 3)])
def test_mask_bias_dim_neither_full_nor_one(name, shape, dim):
    forward_error(ValueError, rf"^{name}: dim {dim} ", **{name: np.zeros(shape, np.float32)})


@pytest.mark.parametrize("name", ["mask", "bias"])
def test_head_dim_of_kv_heads_is_accepted(name):
    q, k, v = inputs()
    operand = np.ones((1, HK, 1, SK), np.float32)
    out = dmattn_cupy.forward(q, k, v, **{name: operand})
    assert out.shape == q.shape


def test_non_float_bias():
    forward_error(TypeError, r"^bias must have a floating dtype; got dtype int64",
                  bias=np.zeros((B, H, SQ, SK), np.int64))


def test_complex_mask():
    forward_error(TypeError, r"^mask must be bool or numeric",
                  mask=np.zeros((B, H, SQ, SK), np.complex64))


# ---------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale(scale):
    forward_error(ValueError, r"^scale must be finite", scale=scale)


@pytest.mark.parametrize("scale", ["0.1", True, np.ones(1)])
def test_non_number_scale(scale):
    forward_error(TypeError, r"^scale must be a real number", scale=scale)


@pytest.mark.parametrize("scale", [-1.0, 0.0, 3, np.float32(0.25)])
def test_any_finite_scale_is_accepted(scale):
    q, k, v = inputs()
    assert np.all(np.isfinite(dmattn_cupy.forward(q, k, v, scale=scale)))


def test_negative_softcap():
    forward_error(ValueError, r"^softcap must be >= 0", softcap=-1.0)


def test_nan_softcap():
    forward_error(ValueError, r"^softcap must be finite", softcap=float("nan"))


@pytest.mark.parametrize("name", ["causal", "return_lse"])
def test_flags_must_be_bool(name):
    forward_error(TypeError, rf"^{name} must be a bool; got str", **{name: "yes"})


# ---------------------------------------------------------------------------------------------
# backward's extra arguments


def backward_error(error, match, **changes):
    q, k, v = inputs()
    out, lse = dmattn_cupy.forward(q, k, v, return_lse=True)
    call = {"dout": np.ones_like(out), "out": out, "lse": lse} | changes
    with pytest.raises(error, match=match):
        dmattn_cupy.backward(call.pop("dout"), q, k, v, call.pop("out"), call.pop("lse"),
                             **call)


@pytest.mark.parametrize("name", ["dout", "out"])
def test_dout_out_must_have_q_shape(name):
    backward_error(ValueError, rf"^{name} must have shape \(B, Sq, H, D\)",
                   **{name: np.zeros((B, SQ, H, D + 1), np.float32)})


def test_lse_shape():
    backward_error(ValueError, r"^lse must have shape \(B, H, Sq\) = \(2, 4, 5\); got \(2, 5, 4\)",
                   lse=np.zeros((B, SQ, H), np.float32))


def test_integer_dout():
    backward_error(TypeError, r"^dout must have a floating dtype",
                   dout=np.zeros((B, SQ, H, D), np.int32))


def test_deterministic_must_be_bool():
    backward_error(TypeError, r"^deterministic must be a bool", deterministic=1)


def test_backward_checks_the_attention_inputs_too():
    backward_error(ValueError, r"^bias: dim 1 ", bias=np.zeros((B, 3, SQ, SK), np.float32))


# ---------------------------------------------------------------------------------------------
# topk_mask


def topk_error(error, match, bias=None, window=3, **options):
    bias = np.zeros((B, H, SQ, SK), np.float32) if bias is None else bias
    with pytest.raises(error, match=match):
        dmattn_cupy.topk_mask(bias, window, **options)


@pytest.mark.parametrize("window", [0, -1, SK + 1])
def test_window_out_of_range(window):
    topk_error(ValueError, rf"^window must be in 1..{SK}; got {window}", window=window)


@pytest.mark.parametrize("window", [2.0, True, None])
def test_window_must_be_an_int(window):
    topk_error(TypeError, r"^window must be an int", window=window)


def test_block_below_one():
    topk_error(ValueError, r"^block must be >= 1; got 0", block=0)


def test_topk_bias_rank_and_dtype():
    topk_error(ValueError, r"^bias must have 4 dims", bias=np.zeros((SQ, SK)))
    topk_error(TypeError, r"^bias must have a floating dtype", bias=np.zeros((1, 1, 1, SK), int))


def test_topk_mask_shape_must_broadcast_to_bias():
    topk_error(ValueError, r"^mask: dim 1 must be 4 \(as bias\) or 1; got 2",
               mask=np.ones((B, 2, SQ, SK), bool))
    topk_error(ValueError, r"^mask must have 4 dims", mask=np.ones((SQ, SK), bool))


def test_topk_causal_must_be_bool():
    topk_error(TypeError, r"^causal must be a bool", causal=None)


# ---------------------------------------------------------------------------------------------
# block maps


def _mask(shape=(B, HK, SQ, SK)):
    return np.random.default_rng(1).random(shape) < 0.5


@pytest.mark.parametrize("mask", [np.zeros((2, 5, 7)), np.zeros((2, 1, 0, 7), dtype=bool),
                                  np.zeros((1, 1, 1, 7), dtype=np.complex64), [[[[1]]]]])
def test_block_map_input(mask):
    error = TypeError if isinstance(mask, list) or mask.dtype.kind == "c" else ValueError
    with pytest.raises(error, match="mask"):
        dmattn_cupy.block_map(mask)


def _map_error(call):
    """forward or backward (both take the mask's map and check it alike), as forward_error."""
    return forward_error if call == "forward" else backward_error


@pytest.mark.parametrize("call", ["forward", "backward"])
def test_block_map_must_be_a_block_map(call):
    _map_error(call)(TypeError, "^block_map must be a dmattn_cupy.BlockMap", mask=_mask(), block_map=np.zeros(3))


@pytest.mark.parametrize("call", ["forward", "backward"])
def test_block_map_needs_its_mask(call):
    block_map = dmattn_cupy.block_map(_mask())
    _map_error(call)(ValueError, "^block_map describes a mask", block_map=block_map)
    _map_error(call)(ValueError, r"^block_map was made from a mask of shape \(2, 2, 5, 7\); got mask shape "
                     r"\(2, 1, 5, 7\)", mask=_mask((B, 1, SQ, SK)), block_map=block_map)


@pytest.mark.parametrize("call", ["forward", "backward"])
@pytest.mark.parametrize("bits", [np.zeros((2, 2, 5, 2, 1), dtype=np.int32), np.zeros((2, 2, 5, 1), dtype=np.uint32),
                                  np.zeros((2, 2, 5, 2, 2), dtype=np.uint32)[..., :1]])
def test_block_map_bits(bits, call):
    block_map = dmattn_cupy.BlockMap(bits, (B, HK, SQ, SK))
    _map_error(call)(ValueError, r"^block_map.bits must be a C-contiguous uint32 array of shape \(2, 2, 5, 2, 1\)",
                     mask=_mask(), block_map=block_map)


def test_a_checked_block_map_does_not_let_a_bad_one_through():
    # forward remembers the signatures of maps it checked (small calls are not bound by Python);
    # a map whose bits differ in any checked property is checked again
    mask, (q, k, v) = _mask(), inputs()
    good = dmattn_cupy.block_map(mask)
    for _ in range(2):
        dmattn_cupy.forward(q, k, v, mask, block_map=good)
    for bits in (good.bits.astype(np.int32), good.bits[..., :1, :], np.asfortranarray(good.bits)):
        forward_error(ValueError, r"^block_map.bits must be", mask=mask,
                      block_map=dmattn_cupy.BlockMap(bits, good.mask_shape))
    forward_error(ValueError, r"^block_map was made from a mask of shape", mask=_mask((B, 1, SQ, SK)),
                  block_map=good)


def test_topk_return_block_map_must_be_bool():
    topk_error(TypeError, "^return_block_map must be a bool", return_block_map=1)


# ---------------------------------------------------------------------------------------------
# CuPy dispatch, without CuPy: a stand-in `cupy` module and array type


class FakeCupyArray:
    """Carries what validation reads (.shape, .dtype, .strides, .ndim) from a NumPy array."""

    __module__ = "cupy"

    def __init__(self, array):
        self.shape, self.dtype, self.strides, self.ndim = (
            array.shape, array.dtype, array.strides, array.ndim)


@pytest.fixture
def fake_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))


def test_mixing_numpy_and_cupy_is_a_type_error(fake_cupy):
    q, k, v = inputs(np.float16)
    with pytest.raises(TypeError, match=r"cannot mix NumPy and CuPy arrays .*k is cupy"):
        dmattn_cupy.forward(q, FakeCupyArray(k), v)
    with pytest.raises(TypeError, match=r"cannot mix NumPy and CuPy arrays .*bias is cupy"):
        dmattn_cupy.topk_mask(FakeCupyArray(np.zeros((1, 1, 1, 4), np.float16)), 2,
                              mask=np.ones((1, 1, 1, 4), bool))


def test_mixing_in_backward_is_a_type_error(fake_cupy):
    grad_like = {name: FakeCupyArray(np.zeros(shape, np.float32)) for name, shape in
                 (("dout", (B, SQ, H, D)), ("out", (B, SQ, H, D)), ("lse", (B, H, SQ)))}
    backward_error(TypeError, r"cannot mix .* \(dout, out, lse are cupy; q, k, v are numpy\)",
                   **grad_like)


def test_cupy_input_applies_the_gpu_checks(fake_cupy):
    q, k, v = (FakeCupyArray(x) for x in inputs(np.float32))
    with pytest.raises(TypeError, match=r"^q: the CUDA path takes float16 or bfloat16"):
        dmattn_cupy.forward(q, k, v)


def test_cupy_input_without_cuda_backend_is_not_implemented(fake_cupy, monkeypatch):
    monkeypatch.setitem(sys.modules, "dmattn_cupy._cuda", None)  # as if it were not installed
    dmattn_cupy._api._cuda_backend.cache_clear()  # the lookup is cached once it succeeds
    q, k, v = (FakeCupyArray(x) for x in inputs(np.float16))
    with pytest.raises(NotImplementedError, match=r"^CUDA kernels"):
        dmattn_cupy.forward(q, k, v)


# ---------------------------------------------------------------------------------------------
# GPU-only checks, on NumPy arrays standing in for CuPy ones (same .shape/.dtype/.strides)


def gpu_inputs(head_dim=64, dtype=np.float16):
    q = np.zeros((1, 3, 4, head_dim), dtype)
    kv = np.zeros((1, 5, 2, head_dim), dtype)
    return q, kv, kv.copy()


def test_gpu_checks_accept_valid_inputs():
    q, k, v = gpu_inputs()
    validate_gpu_inputs(q, k, v, np.ones((1, 1, 3, 5), np.uint8), np.zeros((1, 4, 3, 5), np.float32))
    validate_gpu_inputs(q, k, v, np.ones((1, 1, 3, 5), np.float16), np.zeros((1, 4, 3, 5), q.dtype))
    # Only the last stride must be 1 element: a sliced (non-contiguous) seqlen dim is fine.
    validate_gpu_inputs(np.zeros((1, 6, 4, 64), np.float16)[:, ::2], k, v, None, None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_rejects_full_precision_qkv(dtype):
    with pytest.raises(TypeError, match=r"^q: the CUDA path takes float16 or bfloat16; got dtype"):
        validate_gpu_inputs(*gpu_inputs(dtype=dtype), None, None)


@pytest.mark.parametrize("head_dim", [12, 264, 4])
def test_gpu_head_dim_limits(head_dim):
    with pytest.raises(ValueError, match=rf"^head_dim: .*multiple of 8 up to 256; got {head_dim}"):
        validate_gpu_inputs(*gpu_inputs(head_dim), None, None)


def test_gpu_needs_contiguous_last_dim():
    q, k, v = gpu_inputs()
    strided_k = np.zeros((1, 5, 2, 128), np.float16)[..., ::2]
    with pytest.raises(ValueError, match=r"^k: the CUDA path needs a contiguous last dim"):
        validate_gpu_inputs(q, strided_k, v, None, None)


def test_gpu_bias_dtype():
    q, k, v = gpu_inputs()
    with pytest.raises(TypeError, match=r"^bias: the CUDA path takes q's dtype \(float16\) or float32"):
        validate_gpu_inputs(q, k, v, None, np.zeros((1, 4, 3, 5), np.float64))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
def test_gpu_mask_dtype(dtype):
    q, k, v = gpu_inputs()
    with pytest.raises(TypeError, match=r"^mask: the CUDA path takes bool, uint8, int8 or a float"):
        validate_gpu_inputs(q, k, v, np.ones((1, 1, 3, 5), dtype), None)


def test_gpu_backward_checks():
    dout = np.zeros((1, 3, 4, 64), np.float16)
    validate_gpu_backward_inputs(dout, dout, np.zeros((1, 4, 3), np.float32))
    with pytest.raises(TypeError, match=r"^lse: the CUDA path takes float32; got dtype float64"):
        validate_gpu_backward_inputs(dout, dout, np.zeros((1, 4, 3)))
    with pytest.raises(TypeError, match=r"^out: the CUDA path takes float16 or bfloat16"):
        validate_gpu_backward_inputs(dout, dout.astype(np.float32), np.zeros((1, 4, 3), np.float32))
