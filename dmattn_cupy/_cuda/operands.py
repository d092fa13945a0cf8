"""How the kernels read each input: element strides, broadcast, head mapping, vector access.

Nothing here copies an input the kernels can read as it is: broadcast (size-1 or zero-stride)
masks and biases, and q/k/v views with a unit last stride, are described by their strides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

# Mask dtypes read natively, by element size; any other dtype is turned into bool (a copy).
_MASK_NATIVE = {"bool": 1, "uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "float32": 4}


def element_strides(array) -> tuple[int, ...]:
    """Strides in elements, 0 along dims of size 1 (so a broadcast dim never moves the pointer)."""
    item = array.dtype.itemsize
    return tuple(0 if n == 1 else s // item for n, s in zip(array.shape, array.strides))


def rows_16b_aligned(array) -> bool:
    """Every (batch, row, head) start is 16-byte aligned: whole-chunk cp.async copies are legal."""
    item = array.dtype.itemsize
    return array.data.ptr % 16 == 0 and all((s * item) % 16 == 0 for s in element_strides(array)[:-1])


def qkv_operand(array):
    """q/k/v as the kernels read them: unit last stride and 16-byte aligned rows.

    Views of packed tensors (e.g. q = qkv[:, :, 0]) qualify as they are; an unaligned view is
    the one case copied (into a fresh, aligned array).
    """
    import cupy

    if element_strides(array)[-1] in (0, 1) and rows_16b_aligned(array):
        return array
    return cupy.ascontiguousarray(array)


@dataclass(frozen=True)
class AuxOperand:
    """A mask or bias as the kernels read it (elem_bytes == 0: absent)."""

    array: object
    elem_bytes: int
    strides: tuple[int, int, int, int]
    head_div: int           # query head h reads head h // head_div
    per_query_head: bool    # one head per query head (then heads cannot share a CTA's tile)
    vec: bool               # rows readable as aligned 16-byte chunks

    @property
    def ptr(self) -> int:
        return 0 if self.array is None else int(self.array.data.ptr)


ABSENT = AuxOperand(None, 0, (0, 0, 0, 0), 1, False, False)


def aux_operand(array, *, heads: int, kv_heads: int, seqlen_k: int, is_mask: bool) -> AuxOperand:
    if array is None:
        return ABSENT
    if is_mask and numpy.dtype(array.dtype).name not in _MASK_NATIVE:
        array = array != 0
    elem = array.dtype.itemsize
    strides = element_strides(array)
    n_heads = int(array.shape[1])
    per_query_head = n_heads == heads and heads != kv_heads
    head_div = heads // kv_heads if (n_heads == kv_heads and not per_query_head and n_heads > 1) else 1
    chunk = 16 // elem
    vec = (
        (strides[3] == 1 or seqlen_k == 1)
        and array.data.ptr % 16 == 0
        and all((s * elem) % 16 == 0 for s in strides[:3])
        and seqlen_k % chunk == 0
    )
    return AuxOperand(array, elem, strides, head_div, per_query_head, vec)
