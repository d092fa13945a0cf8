"""topk_mask launcher: one CTA per query row runs a radix select (kernels_cu/topk.cu).

Reads bias and mask through their strides (broadcast dims have stride 0, so nothing is copied or
expanded) and allocates only the bool output, on CuPy's current stream.
"""

from __future__ import annotations

import math

import numpy

from .._block_map import MAP_PLANES, BlockMap, map_shape, map_words
from . import compile as nvrtc
from . import device
from .operands import element_strides
from .params import TOPK_PARAMS, new_record

# Template argument of each bias dtype: the kernel ranks the raw bits, so only the format matters.
_BIAS_TYPES = {"float16": "dmattn::fp16_t", "bfloat16": "dmattn::bf16_t", "float32": "float",
               "float64": "double"}
_NARROW_THREADS = 256     # many rows: several CTAs per multiprocessor hide the memory latency
_WIDE_THREADS = 1024      # kernels_cu/topk.cu: kTopkMaxThreads
_THREADS_PER_SM = 2048    # resident threads per multiprocessor (sm_80, sm_90)


def threads_per_row(rows: int, seqlen_k: int, sm_count: int) -> int:
    """Threads of the CTA owning one row: 256, or 1024 when 256-thread CTAs could not fill the GPU
    (decode: a few long rows); never more warps than the row has 32-key steps."""
    wide = rows * _NARROW_THREADS < sm_count * _THREADS_PER_SM
    threads = _WIDE_THREADS if wide else _NARROW_THREADS
    return min(threads, 32 * math.ceil(seqlen_k / 32))


def mask_template_args(dtype) -> tuple[int, bool]:
    """(element bytes, float?) of a mask dtype; (0, False): no mask. A float mask element keeps
    when any bit but the sign is set (mask != 0: -0.0 hides, NaN keeps)."""
    if dtype is None:
        return 0, False
    dtype = numpy.dtype(dtype)
    return dtype.itemsize, dtype.kind == "f" or dtype.name == "bfloat16"


def topk_mask(bias, window: int, causal: bool, block: int | None, mask, with_map: bool = False):
    """See dmattn_cupy.topk_mask; inputs are validated there. with_map: returns (mask, BlockMap),
    the map written by the same kernel as the mask."""
    import cupy

    _, sm_count = device.current()
    seqlen_k = int(bias.shape[-1])
    out = cupy.empty(bias.shape, dtype=cupy.bool_)
    words = map_words(seqlen_k)
    bits = cupy.empty(map_shape(out.shape), dtype=numpy.uint32) if with_map else None
    result = (out, BlockMap(bits, tuple(out.shape))) if with_map else out
    rows = out.size // seqlen_k
    if rows == 0:
        return result
    rec = new_record(TOPK_PARAMS)
    rec["bias"], rec["out"] = bias.data.ptr, out.data.ptr
    if with_map:
        rec["block_map"], rec["map_words"] = bits.data.ptr, words
    rec["bias_stride"] = element_strides(bias)
    if mask is not None:
        rec["mask"], rec["mask_stride"] = mask.data.ptr, element_strides(mask)
    rec["heads"], rec["seqlen_q"], rec["seqlen_k"] = bias.shape[1], bias.shape[2], seqlen_k
    rec["window"], rec["causal"] = window, causal
    # A block of 1 keeps exactly the chosen keys: the same as no smoothing. A block longer than the
    # row is one block of the row's length.
    rec["block"] = 0 if block is None or block == 1 else min(block, seqlen_k)
    name = nvrtc.kernel_name("topk_mask_kernel", _BIAS_TYPES[numpy.dtype(bias.dtype).name],
                             *mask_template_args(None if mask is None else mask.dtype))
    kernel = nvrtc.get_kernel("topk.cu", name)
    nvrtc.launch(kernel, (rows,), threads_per_row(rows, seqlen_k, sm_count), rec,
                 4 * MAP_PLANES * words if with_map else 0)
    return result
