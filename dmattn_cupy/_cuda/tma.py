"""TMA tensor maps (kernels_cu/tma.cuh) for the Hopper forward's Q, K and V tiles.

CuPy does not wrap the driver's cuTensorMapEncodeTiled, so it is called through ctypes. A map
holds the tensor's address, so it is encoded per array; a small cache keyed by everything the
map depends on (address, shape, strides, box) makes repeated calls on the same arrays free.
"""

from __future__ import annotations

import ctypes
import functools

import numpy

from .operands import element_strides
from .params import TENSOR_MAP_WORDS

# cuda.h enums
_UINT16 = 1            # CU_TENSOR_MAP_DATA_TYPE_UINT16: bf16/fp16 bits (out of range: 0 = +0.0)
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3      # 16-byte chunk c of row r at c ^ (r % 8): the wgmma slabs (wgmma.cuh)
_L2_PROMOTION_256B = 3
_OOB_FILL_ZEROS = 0
SLAB_COLS = 64         # a box row: 64 two-byte elements = the 128-byte swizzle span
_MAX_STRIDE = 1 << 40
_CACHE: dict = {}
_CACHE_MAX = 64


@functools.lru_cache(maxsize=None)
def _encoder():
    """cuTensorMapEncodeTiled, or None where the driver library or the entry point is missing."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


def bshd_tensor_map(x, box_rows: int):
    """The TENSOR_MAP_WORDS uint64 words of a tensor map of Q, K or V, (B, S, H, D) read as the
    (D, H, S, B) tensor TMA counts innermost first, in boxes of SLAB_COLS columns x box_rows rows
    of one (batch, head), 128-byte swizzled; columns past D and rows past S land as zeros.
    None when TMA cannot read x: no driver entry point, or a stride TMA cannot express (not a
    multiple of 16 bytes, or zero: a broadcast dimension)."""
    B, S, H, D = (int(n) for n in x.shape)
    key = (x.data.ptr, (B, S, H, D), tuple(x.strides), box_rows)
    if key in _CACHE:
        return _CACHE[key]
    words = _encode(x, box_rows)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = words
    return words


def _encode(x, box_rows: int):
    fn = _encoder()
    if fn is None or x.data.ptr % 16:
        return None
    B, S, H, D = (int(n) for n in x.shape)
    sb, ss, sh, _ = element_strides(x)
    strides = []
    for extent, stride in ((H, sh), (S, ss), (B, sb)):
        nbytes = stride * x.dtype.itemsize if extent > 1 else 16  # a single index never moves
        if nbytes <= 0 or nbytes % 16 or nbytes >= _MAX_STRIDE:
            return None
        strides.append(nbytes)
    u64s, u32s = ctypes.c_uint64 * 4, ctypes.c_uint32 * 4
    buf = numpy.zeros(TENSOR_MAP_WORDS + 8, dtype=numpy.uint64)  # holds a 64-byte aligned map
    first = (-buf.ctypes.data % 64) // 8
    rc = fn(buf.ctypes.data + 8 * first, _UINT16, 4, x.data.ptr, u64s(D, H, S, B), (ctypes.c_uint64 * 3)(*strides),
            u32s(SLAB_COLS, 1, box_rows, 1), u32s(1, 1, 1, 1), _INTERLEAVE_NONE, _SWIZZLE_128B,
            _L2_PROMOTION_256B, _OOB_FILL_ZEROS)
    return buf[first:first + TENSOR_MAP_WORDS].copy() if rc == 0 else None
