"""block_map launcher (kernels_cu/block_map.cu): a mask's block map on CuPy's current stream.

Two users: dmattn_cupy.block_map (a map kept by the caller, every key read) and the forward, which
makes the map of a mask passed without one before the wide Hopper kernel (under the call's causal
limit: only the keys a row sees are read). MapPass holds one launch's record so that the forward's
cached plans refill two pointers per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy

from .._block_map import MAP_PLANES, BlockMap, map_shape, map_words
from . import compile as nvrtc
from .operands import aux_operand
from .params import BLOCK_MAP_PARAMS, new_record, pointer_slots

THREADS = 256  # kernels_cu/block_map.cu kBlockMapThreads: a warp per row
_MASK, _BITS = pointer_slots(BLOCK_MAP_PARAMS, "mask", "bits")


@dataclass(frozen=True)
class MapPass:
    """block_map_kernel over one mask layout. `words`: the BlockMapParams record as uint64 words,
    its two pointers stored by each launch (under the caller's lock, as the forward's plan)."""

    words: numpy.ndarray
    kernel: object
    grid: tuple[int]
    map_elems: int  # u32 words of the map it writes
    buffer: nvrtc.ParamBuffer = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "buffer", nvrtc.ParamBuffer(self.words))

    def launch(self, mask_ptr: int, bits_ptr: int, stream: int) -> None:
        self.words[_MASK], self.words[_BITS] = mask_ptr, bits_ptr
        nvrtc.launch_args(self.kernel, self.grid, THREADS, self.buffer.args, 0, stream)


def map_pass(mask, dims: tuple, seqlen_k: int, causal_seqlen_q: int = 0) -> MapPass:
    """The launch that maps `mask` (an operands.AuxOperand) over rows of `dims` (batch, heads, seq
    rows; 1 where one row serves all). causal_seqlen_q > 0: read only what a causal row sees."""
    rec = new_record(BLOCK_MAP_PARAMS)
    words = map_words(seqlen_k)
    rows = math.prod(dims)
    rec["mask_stride"] = mask.strides
    rec["rows"], rec["heads"], rec["seq_rows"] = rows, dims[1], dims[2]
    rec["seqlen_k"], rec["words"], rec["causal_seqlen_q"] = seqlen_k, words, causal_seqlen_q
    kernel = nvrtc.get_kernel("block_map.cu", nvrtc.kernel_name("block_map_kernel", mask.elem_bytes, mask.vec))
    return MapPass(rec.view(numpy.uint64), kernel, (math.ceil(rows / (THREADS // 32)),), rows * MAP_PLANES * words)


def block_map(mask) -> BlockMap:
    """See dmattn_cupy.block_map; the mask is validated there."""
    import cupy

    shape = tuple(int(n) for n in mask.shape)
    operand = aux_operand(mask, heads=shape[1], kv_heads=shape[1], seqlen_k=shape[3], is_mask=True)
    launch = map_pass(operand, shape[:3], shape[3])
    bits = cupy.empty(map_shape(shape), dtype=numpy.uint32)
    launch.launch(operand.ptr, bits.data.ptr, cupy.cuda.get_current_stream().ptr)
    return BlockMap(bits, shape)
