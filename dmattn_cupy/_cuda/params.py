"""NumPy structured dtypes that mirror kernels_cu/params.cuh field by field.

`align=True` gives each field C's natural alignment, so a record's bytes are exactly the C struct
that the kernel receives by value. tests/test_params_layout.py compiles the header with nvcc and
checks every offset and size against these dtypes.
"""

from __future__ import annotations

import numpy

_PTR = numpy.uint64
_I64 = numpy.int64
_I32 = numpy.int32
_F32 = numpy.float32

ATTN_PARAMS = numpy.dtype(
    [
        ("q", _PTR), ("k", _PTR), ("v", _PTR), ("mask", _PTR), ("bias", _PTR), ("block_map", _PTR),
        ("q_stride", _I64, (3,)), ("k_stride", _I64, (3,)), ("v_stride", _I64, (3,)),
        ("mask_stride", _I64, (4,)), ("bias_stride", _I64, (4,)), ("map_stride", _I64, (3,)),
        ("batch", _I32), ("heads", _I32), ("kv_heads", _I32),
        ("seqlen_q", _I32), ("seqlen_k", _I32), ("head_dim", _I32),
        ("group", _I32), ("mask_head_div", _I32), ("bias_head_div", _I32), ("pack", _I32),
        ("mask_vec", _I32), ("bias_vec", _I32),
        ("scale", _F32), ("scale_log2", _F32), ("softcap", _F32), ("map_words", _I32),
    ],
    align=True,
)



def _padded(dtype: numpy.dtype, alignment: int) -> numpy.dtype:
    """dtype with its size rounded up to `alignment` (C pads a struct with an alignas(64) member
    to a multiple of 64 bytes; NumPy's align=True only knows alignments up to 16)."""
    size = -(-dtype.itemsize // alignment) * alignment
    return numpy.dtype({"names": list(dtype.names), "formats": [dtype.fields[n][0] for n in dtype.names],
                        "offsets": [dtype.fields[n][1] for n in dtype.names], "itemsize": size})


TENSOR_MAP_WORDS = 16  # CUtensorMap: 128 bytes, 64-byte aligned (params.cuh TensorMap)

FWD_PARAMS = _padded(numpy.dtype(
    [
        # first, so that the 64-byte alignment holds at offsets 0, 128 and 256
        ("k_map", numpy.uint64, (TENSOR_MAP_WORDS,)), ("v_map", numpy.uint64, (TENSOR_MAP_WORDS,)),
        ("q_map", numpy.uint64, (TENSOR_MAP_WORDS,)),
        ("a", ATTN_PARAMS),
        ("out", _PTR), ("o_stride", _I64, (3,)), ("lse", _PTR),
        ("o_split", _PTR), ("lse_split", _PTR), ("tiles_visited", _PTR), ("arrivals", _PTR),
        ("num_splits", _I32), ("tiles_per_split", _I32), ("stages", _I32), ("keys_per_split", _I32),
        ("m_blocks", _I32), ("row_groups", _I32),
    ],
    align=True,
), 64)

BWD_PARAMS = numpy.dtype(
    [
        ("a", ATTN_PARAMS),
        ("out", _PTR), ("dout", _PTR), ("o_stride", _I64, (3,)), ("do_stride", _I64, (3,)),
        ("lse", _PTR), ("row_stats", _PTR), ("dq_accum", _PTR),
        ("dq", _PTR), ("dk", _PTR), ("dv", _PTR), ("dbias", _PTR), ("dbias_accum", _PTR),
        ("dbias_stride", _I64, (4,)),
        ("dbias_rows_reduced", _I32), ("dbias_head_div", _I32),
        ("deterministic", _I32), ("chunk_tiles", _I32),
        ("turns", _PTR), ("kv_bound", _PTR), ("dq_scale", _PTR),
        ("dkv_partial", _PTR), ("dkv_count", _PTR), ("tiles_visited", _PTR),
    ],
    align=True,
)

TOPK_PARAMS = numpy.dtype(
    [
        ("bias", _PTR), ("mask", _PTR), ("out", _PTR), ("block_map", _PTR),
        ("bias_stride", _I64, (4,)), ("mask_stride", _I64, (4,)),
        ("heads", _I32), ("seqlen_q", _I32), ("seqlen_k", _I32),
        ("window", _I32), ("block", _I32), ("causal", _I32), ("map_words", _I32),
    ],
    align=True,
)

BLOCK_MAP_PARAMS = numpy.dtype(
    [
        ("mask", _PTR), ("bits", _PTR), ("mask_stride", _I64, (4,)),
        ("rows", _I32), ("heads", _I32), ("seq_rows", _I32), ("seqlen_k", _I32), ("words", _I32),
        ("causal_seqlen_q", _I32),
    ],
    align=True,
)

# C struct name -> dtype, for the layout test.
STRUCTS = {"AttnParams": ATTN_PARAMS, "FwdParams": FWD_PARAMS, "BwdParams": BWD_PARAMS,
           "TopkParams": TOPK_PARAMS, "BlockMapParams": BLOCK_MAP_PARAMS}


def pointer_slots(dtype: numpy.dtype, *paths: str) -> tuple[int, ...]:
    """Indexes, in the record viewed as uint64, of the pointer fields at `paths` ("a.q", "out").

    Lets a cached record get its per-call pointers with plain integer stores.
    """
    slots = []
    for path in paths:
        offset, current = 0, dtype
        for name in path.split("."):
            sub, off = current.fields[name][:2]
            offset, current = offset + off, sub
        assert offset % 8 == 0 and current == numpy.dtype(_PTR)
        slots.append(offset // 8)
    return tuple(slots)


def new_record(dtype: numpy.dtype) -> numpy.ndarray:
    """A zeroed one-element record array (null pointers, zero strides), filled field by field
    (`rec["a"]["q"] = ...` writes through) and passed to the kernel as its by-value struct."""
    return numpy.zeros((1,), dtype=dtype)
