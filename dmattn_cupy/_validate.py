"""Input checks for every public function, done once at the API boundary.

Each error names the argument, what was expected and what was given. Internals (the NumPy
reference, the CUDA backend) trust the `Problem` returned here and re-check nothing.

Shapes (the letters used in every message):
    q            (B, Sq, H,  D)
    k, v         (B, Sk, Hk, D)      H % Hk == 0
    mask, bias   (B|1, H|Hk|1, Sq|1, Sk)
    dout, out    (B, Sq, H, D)
    lse          (B, H, Sq)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from types import ModuleType

import numpy

from ._arrays import array_module, is_cupy
from ._block_map import BlockMap, map_shape

# Limits of the CUDA kernels (tile traits exist for these head dims only).
GPU_MAX_HEAD_DIM = 256
GPU_HEAD_DIM_MULTIPLE = 8
GPU_QKV_DTYPES = ("float16", "bfloat16")
GPU_MASK_INT_DTYPES = ("bool", "uint8", "int8")


@dataclass(frozen=True)
class Problem:
    """Sizes and options of one attention call, resolved and checked."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float  # resolved: 1/sqrt(head_dim) when the caller passed None
    causal: bool
    softcap: float
    xp: ModuleType  # numpy or cupy

    @property
    def group_size(self) -> int:
        """Query heads per kv head: query head h reads kv head h // group_size."""
        return self.heads // self.kv_heads


# ---------------------------------------------------------------------------------------------
# Small predicates and messages


def _dtype_name(array) -> str:
    return numpy.dtype(array.dtype).name


def _is_float(array) -> bool:
    # bfloat16 (ml_dtypes, used by CuPy) is not a NumPy floating subtype, so it is named.
    return numpy.dtype(array.dtype).kind == "f" or _dtype_name(array) == "bfloat16"


def _is_numeric_or_bool(array) -> bool:
    return numpy.dtype(array.dtype).kind in "biu" or _is_float(array)


def _shape(array) -> tuple[int, ...]:
    return tuple(int(n) for n in array.shape)


def require_bool(name: str, value: object) -> bool:
    if not isinstance(value, (bool, numpy.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__qualname__}")
    return bool(value)


def _require_rank(name: str, array, layout: str) -> None:
    rank = layout.count(",") + 1  # layout reads "(batch, seqlen_q, ...)"
    if array.ndim != rank:
        raise ValueError(f"{name} must have {rank} dims {layout}; got shape {_shape(array)}")


def _require_float(name: str, array) -> None:
    if not _is_float(array):
        raise TypeError(f"{name} must have a floating dtype; got dtype {_dtype_name(array)}")


def _require_shape(name: str, array, expected: tuple[int, ...], layout: str) -> None:
    if _shape(array) != expected:
        raise ValueError(f"{name} must have shape {layout} = {expected}; got {_shape(array)}")


def _require_real(name: str, value: object) -> float:
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__qualname__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return float(value)


def _require_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__qualname__}")
    if value < low or (high is not None and value > high):
        bounds = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}; got {value}")
    return int(value)


def _require_broadcast_shape(name: str, array, batch: int, heads: int, kv_heads: int,
                             seqlen_q: int, seqlen_k: int) -> None:
    """mask/bias are (B|1, H|Hk|1, Sq|1, Sk): each dim full or broadcast; heads may be Hk."""
    _require_rank(name, array, "(batch, heads, seqlen_q, seqlen_k)")
    allowed = ({batch, 1}, {heads, kv_heads, 1}, {seqlen_q, 1}, {seqlen_k})
    dim_names = ("batch", "heads", "seqlen_q", "seqlen_k")
    for dim, (size, sizes, dim_name) in enumerate(zip(_shape(array), allowed, dim_names)):
        if size not in sizes:
            options = " or ".join(str(s) for s in sorted(sizes, reverse=True))
            raise ValueError(f"{name}: dim {dim} ({dim_name}) must be {options}; got {size} "
                             f"({name} shape {_shape(array)})")


def _require_mask_dtype(mask) -> None:
    if not _is_numeric_or_bool(mask):
        raise TypeError(f"mask must be bool or numeric (nonzero = keep); "
                        f"got dtype {_dtype_name(mask)}")


# ---------------------------------------------------------------------------------------------
# Public checks


# Validation depends only on the arrays' kinds, shapes, dtypes and strides and on the options, so
# a signature that passed once is not checked again: small calls (decode) are not bound by Python.
_VALIDATED: dict = {}
_VALIDATED_MAX = 512


def _signature(arrays, options) -> tuple:
    return tuple(None if x is None else (type(x), x.shape, x.dtype, x.strides) for x in arrays) + options


def validate_attention(q, k, v, mask, bias, scale, causal, softcap) -> Problem:
    """Check the inputs of forward/backward and resolve them into a Problem."""
    try:
        key = _signature((q, k, v, mask, bias), (scale, causal, softcap))
        problem = _VALIDATED.get(key)
    except (AttributeError, TypeError):  # not arrays, or unhashable options: full checks report it
        key = problem = None
    if problem is None:
        problem = _validate_attention(q, k, v, mask, bias, scale, causal, softcap)
        if key is not None:
            if len(_VALIDATED) >= _VALIDATED_MAX:
                _VALIDATED.clear()
            _VALIDATED[key] = problem
    return problem


def _validate_attention(q, k, v, mask, bias, scale, causal, softcap) -> Problem:
    xp = array_module(q=q, k=k, v=v, mask=mask, bias=bias)
    _require_rank("q", q, "(batch, seqlen_q, heads, head_dim)")
    _require_rank("k", k, "(batch, seqlen_k, kv_heads, head_dim)")
    _require_rank("v", v, "(batch, seqlen_k, kv_heads, head_dim)")
    batch, seqlen_q, heads, head_dim = _shape(q)
    _, seqlen_k, kv_heads, _ = _shape(k)
    if min(_shape(q)) < 1 or min(_shape(k)) < 1:
        raise ValueError(f"q and k must have no empty dims; got q {_shape(q)}, k {_shape(k)}")
    kv_shape = (batch, seqlen_k, kv_heads, head_dim)
    _require_shape("k", k, kv_shape, "(B, Sk, Hk, D) with B and D of q")
    _require_shape("v", v, kv_shape, "(B, Sk, Hk, D) = k's shape")
    if heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads}); "
                         f"q {_shape(q)}, k {_shape(k)}")
    for name, array in (("q", q), ("k", k), ("v", v)):
        _require_float(name, array)
    if not _dtype_name(q) == _dtype_name(k) == _dtype_name(v):
        raise TypeError(f"q, k, v must share one dtype; got q {_dtype_name(q)}, "
                        f"k {_dtype_name(k)}, v {_dtype_name(v)}")
    if mask is not None:
        _require_broadcast_shape("mask", mask, batch, heads, kv_heads, seqlen_q, seqlen_k)
        _require_mask_dtype(mask)
    if bias is not None:
        _require_broadcast_shape("bias", bias, batch, heads, kv_heads, seqlen_q, seqlen_k)
        _require_float("bias", bias)

    scale = 1.0 / math.sqrt(head_dim) if scale is None else _require_real("scale", scale)
    softcap = _require_real("softcap", softcap)
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it); got {softcap}")
    problem = Problem(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads=heads,
                      kv_heads=kv_heads, head_dim=head_dim, scale=scale,
                      causal=require_bool("causal", causal), softcap=softcap, xp=xp)
    if is_cupy(xp):
        validate_gpu_inputs(q, k, v, mask, bias)
    return problem


def validate_backward(dout, out, lse, problem: Problem) -> None:
    """Check the extra inputs of backward against an already validated Problem."""
    xp = array_module(dout=dout, out=out, lse=lse)
    if xp is not problem.xp:
        raise TypeError(f"cannot mix NumPy and CuPy arrays in one call (dout, out, lse are "
                        f"{xp.__name__}; q, k, v are {problem.xp.__name__})")
    q_shape = (problem.batch, problem.seqlen_q, problem.heads, problem.head_dim)
    _require_shape("dout", dout, q_shape, "(B, Sq, H, D) = q's shape")
    _require_shape("out", out, q_shape, "(B, Sq, H, D) = q's shape")
    _require_shape("lse", lse, (problem.batch, problem.heads, problem.seqlen_q), "(B, H, Sq)")
    for name, array in (("dout", dout), ("out", out), ("lse", lse)):
        _require_float(name, array)
    if is_cupy(xp):
        validate_gpu_backward_inputs(dout, out, lse)


def validate_topk(bias, window, causal, block, mask) -> ModuleType:
    """Check topk_mask's inputs; returns the array module to run on."""
    xp = array_module(bias=bias, mask=mask)
    _require_rank("bias", bias, "(batch, heads, seqlen_q, seqlen_k)")
    _require_float("bias", bias)
    seqlen_k = _shape(bias)[-1]
    if mask is not None:
        _require_rank("mask", mask, "(batch, heads, seqlen_q, seqlen_k)")
        for dim, (size, full) in enumerate(zip(_shape(mask), _shape(bias))):
            if size not in (full, 1):
                raise ValueError(f"mask: dim {dim} must be {full} (as bias) or 1; got {size} "
                                 f"(mask shape {_shape(mask)}, bias shape {_shape(bias)})")
        _require_mask_dtype(mask)
    _require_int("window", window, 1, seqlen_k)
    if block is not None:
        _require_int("block", block, 1)
    require_bool("causal", causal)
    return xp


# ---------------------------------------------------------------------------------------------
# CUDA-path checks: pure shape/dtype/stride checks, so they also run on stand-in objects.


def _require_last_dim_contiguous(name: str, array) -> None:
    itemsize = numpy.dtype(array.dtype).itemsize
    if array.strides[-1] != itemsize:
        raise ValueError(f"{name}: the CUDA path needs a contiguous last dim (stride "
                         f"{itemsize} bytes); got strides {tuple(array.strides)}")


def _require_gpu_half(name: str, array) -> None:
    if _dtype_name(array) not in GPU_QKV_DTYPES:
        raise TypeError(f"{name}: the CUDA path takes float16 or bfloat16; "
                        f"got dtype {_dtype_name(array)}")
    _require_last_dim_contiguous(name, array)


def validate_gpu_inputs(q, k, v, mask, bias) -> None:
    """Checks that only the CUDA kernels need (dtype, head dim, last-dim stride).

    q, k, v sharing one dtype is checked before, on every path.
    """
    for name, array in (("q", q), ("k", k), ("v", v)):
        _require_gpu_half(name, array)
    head_dim = _shape(q)[-1]
    if head_dim > GPU_MAX_HEAD_DIM or head_dim % GPU_HEAD_DIM_MULTIPLE:
        raise ValueError(f"head_dim: the CUDA path needs a multiple of {GPU_HEAD_DIM_MULTIPLE} "
                         f"up to {GPU_MAX_HEAD_DIM}; got {head_dim} (q shape {_shape(q)})")
    if bias is not None and _dtype_name(bias) not in (_dtype_name(q), "float32"):
        raise TypeError(f"bias: the CUDA path takes q's dtype ({_dtype_name(q)}) or float32; "
                        f"got dtype {_dtype_name(bias)}")
    if mask is not None and not (_dtype_name(mask) in GPU_MASK_INT_DTYPES or _is_float(mask)):
        raise TypeError(f"mask: the CUDA path takes bool, uint8, int8 or a float dtype; "
                        f"got dtype {_dtype_name(mask)}")


def validate_gpu_backward_inputs(dout, out, lse) -> None:
    """backward's extra CUDA-only checks: dout/out like q (half precision), lse float32."""
    for name, array in (("dout", dout), ("out", out)):
        _require_gpu_half(name, array)
    if _dtype_name(lse) != "float32":
        raise TypeError(f"lse: the CUDA path takes float32; got dtype {_dtype_name(lse)}")


# ---------------------------------------------------------------------------------------------
# Block maps (dmattn_cupy._block_map)


def validate_mask_array(mask) -> ModuleType:
    """block_map's input: a 4-d bool or numeric mask with no empty dim; returns its module."""
    xp = array_module(mask=mask)
    _require_rank("mask", mask, "(batch, heads, seqlen_q, seqlen_k)")
    if min(_shape(mask)) < 1:
        raise ValueError(f"mask must have no empty dims; got shape {_shape(mask)}")
    _require_mask_dtype(mask)
    return xp


def validate_block_map(block_map, mask, xp: ModuleType) -> None:
    """forward's and backward's block_map: a BlockMap made from a mask of this mask's shape, on its
    device."""
    if block_map is None:
        return
    try:  # as validate_attention: a signature that passed once is not checked again
        key = (type(block_map), block_map.mask_shape) + _signature((block_map.bits, mask), (xp,))
        if key in _VALIDATED:
            return
    except (AttributeError, TypeError):  # not a BlockMap, or unhashable: the checks below report it
        key = None
    _validate_block_map(block_map, mask, xp)
    if key is not None:
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[key] = True


def _validate_block_map(block_map, mask, xp: ModuleType) -> None:
    if not isinstance(block_map, BlockMap):
        raise TypeError("block_map must be a dmattn_cupy.BlockMap (from block_map(mask) or "
                        "topk_mask(..., return_block_map=True)) or None; "
                        f"got {type(block_map).__qualname__}")
    if mask is None:
        raise ValueError("block_map describes a mask: pass the mask it was made from; got mask=None")
    if tuple(block_map.mask_shape) != _shape(mask):
        raise ValueError(f"block_map was made from a mask of shape {tuple(block_map.mask_shape)}; "
                         f"got mask shape {_shape(mask)}")
    bits = block_map.bits
    bits_xp = array_module(**{"block_map.bits": bits})
    if bits_xp is not xp:
        raise TypeError(f"block_map.bits is a {bits_xp.__name__} array; the other inputs are "
                        f"{xp.__name__} arrays")
    expected = map_shape(_shape(mask))
    if _dtype_name(bits) != "uint32" or _shape(bits) != expected or not bits.flags.c_contiguous:
        raise ValueError(f"block_map.bits must be a C-contiguous uint32 array of shape {expected}; "
                         f"got {_dtype_name(bits)} {_shape(bits)}"
                         f"{'' if bits.flags.c_contiguous else ', not contiguous'}")
