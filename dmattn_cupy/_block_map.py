"""BlockMap: which (mask row, key tile) pairs of a mask hold a kept key, and which keep every key.

A forward call with a mask must know which (query tile x key tile) pairs it can skip. Found from
the mask, that is a pass over every byte of it (for gqa8k's causal bool mask, 270 MB: ~0.1 ms on an
H100), paid again by each call. A BlockMap is that pass's result kept: two bits per mask row and
128-key tile (1/512 of a bool mask's bytes). Make it once per mask (``block_map(mask)``), or get
it from ``topk_mask(..., return_block_map=True)`` at no extra pass, and hand it to every forward
call with that mask (each layer, each head group, the benchmark's repeats), as FlexAttention's
BlockMask is made once and reused.

The map describes its mask and nothing else: a map that is not ``block_map(mask)`` for the mask
passed with it (a mask changed in place after the map was made, for one) gives undefined results,
as a stale BlockMask does in FlexAttention. The forward checks the shapes, not the bits.

Layout (kernels_cu/block_map.cuh): ``bits`` is uint32 of shape (mask B, mask H, mask Sq, 2, words),
the mask's own leading dims (a broadcast dim stays 1), words = ceil(ceil(Sk / 128) / 32). Bit
t % 32 of word t // 32 is, in plane 0 ("any"), set when the row keeps a key in [128 t, 128 t + 128);
in plane 1 ("full"), set when it keeps every key there (below Sk). Skipping needs "any"; where no
row of a query tile keeps a tile in part (any and not full), the forward needs neither the tile's
mask rows nor a test per score. The reference below is the definition; the CUDA path gives the
same bits (tests/test_block_map_gpu.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import numpy

from ._arrays import array_module

MAP_KEYS = 128  # keys per bit: the wide Hopper forward's key tile (kernels_cu/block_map.cuh kMapKeys)
MAP_PLANES = 2  # any, full (kMapPlanes)


def map_words(seqlen_k: int) -> int:
    """u32 words per mask row and plane: one bit per MAP_KEYS keys."""
    return math.ceil(math.ceil(seqlen_k / MAP_KEYS) / 32)


def map_shape(mask_shape: tuple) -> tuple:
    """BlockMap.bits' shape for a mask of shape `mask_shape`: its leading dims, planes, words."""
    return tuple(int(n) for n in mask_shape[:3]) + (MAP_PLANES, map_words(int(mask_shape[3])))


def map_strides(dims: tuple, words: int) -> tuple[int, int, int]:
    """Word strides of a C-ordered map over (batch, head, row) dims `dims` with `words` words per
    plane; 0 along a dim of 1 (one row serves every index there, as a broadcast mask does)."""
    batch, heads, rows = dims
    row = MAP_PLANES * words
    return (heads * rows * row if batch > 1 else 0, rows * row if heads > 1 else 0, row if rows > 1 else 0)


@dataclass(frozen=True, eq=False)
class BlockMap:
    """Two bits per (mask row, 128-key tile) of a mask: the tile holds a kept key; it keeps every key.

    bits: uint32 array (NumPy or CuPy, as the mask), shape mask.shape[:3] + (2, words).
    mask_shape: the shape of the mask it was made from; forward accepts the map only with a mask
    of this shape.
    """

    bits: object
    mask_shape: tuple

    @property
    def key_tiles(self) -> int:
        return -(-self.mask_shape[-1] // MAP_KEYS)

    def tiles(self):
        """The map as bool, shape mask.shape[:3] + (key tiles,): True where the row keeps a key."""
        return self._unpack(0)

    def full_tiles(self):
        """The same shape: True where the row keeps every key of the tile."""
        return self._unpack(1)

    def _unpack(self, plane: int):
        xp = array_module(bits=self.bits)
        shifts = xp.arange(32, dtype=numpy.uint32)
        unpacked = (self.bits[..., plane, :, None] >> shifts) & numpy.uint32(1)
        return unpacked.reshape(self.bits.shape[:-2] + (-1,))[..., :self.key_tiles] != 0

    def density(self) -> float:
        """Fraction of (row, key tile) pairs holding a kept key."""
        return float(self.tiles().mean())


def reference_bits(mask, xp: ModuleType):
    """The map's bits by array operations (the definition; the NumPy path). mask != 0 keeps, as in
    forward (a float -0.0 hides, NaN keeps); keys past Sk in the last tile count as kept for "full"."""
    shape = tuple(mask.shape)
    seqlen_k = shape[-1]
    words = map_words(seqlen_k)
    padded = xp.ones(shape[:-1] + (words * 32 * MAP_KEYS,), dtype=bool)
    padded[..., :seqlen_k] = mask != 0
    tiled = padded.reshape(shape[:-1] + (words, 32, MAP_KEYS))
    keys_in = xp.arange(words * 32 * MAP_KEYS).reshape(words, 32, MAP_KEYS) < seqlen_k
    tile_any = (tiled & keys_in).any(axis=-1)
    planes = xp.stack([tile_any, tile_any & tiled.all(axis=-1)], axis=-3)  # (..., 2, words, 32)
    weights = xp.left_shift(xp.uint64(1), xp.arange(32, dtype=xp.uint64))
    return (planes.astype(xp.uint64) * weights).sum(axis=-1).astype(xp.uint32)


def reference_block_map(mask, xp: ModuleType) -> BlockMap:
    return BlockMap(reference_bits(mask, xp), tuple(int(n) for n in mask.shape))
