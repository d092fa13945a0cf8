"""topk_mask: keep the `window` largest bias entries per query row, as a bool mask.

The reference path, run for NumPy arrays; CuPy arrays run kernels_cu/topk.cu, which gives the
same result bit for bit (tests/test_topk_gpu.py). Written against an array module `xp`: only
argsort, where, reshape, sum and fancy-index assignment are used.

Steps for a bias of shape (B, H, Sq, Sk) (any of the first three dims may be 1):
    visible = (mask != 0) & (causal: j <= i + Sk - Sq)      hidden keys never count
    keep    = the `window` visible keys with the largest bias in each row
              (ties go to the earlier key; rows with fewer visible keys keep them all and fill
              the window with their earliest hidden keys, then with visible NaN keys: NumPy
              sorts NaN last)
    block   = optional: a block of `block` keys is kept when more than half of its keys are
              (the last, partial block compares against its own length; hidden keys that
              filled the window count here)
    result  = keep & visible
With causal, the query length is the bias's own Sq dim (a broadcast dim of 1 is one query row,
the last, which sees every key).
"""

from __future__ import annotations

from types import ModuleType


def _visible_keys(bias, mask, causal: bool, xp: ModuleType):
    visible = xp.ones(bias.shape, dtype=bool)
    if mask is not None:
        visible &= mask != 0  # mask dims are bias's or 1: broadcasting fills them in
    if causal:
        seqlen_q, seqlen_k = bias.shape[-2:]
        i = xp.arange(seqlen_q)[:, None]
        j = xp.arange(seqlen_k)[None, :]
        visible &= j <= i + seqlen_k - seqlen_q  # bottom-right aligned
    return visible


def _largest_visible(bias, visible, window: int, xp: ModuleType):
    """Bool, bias's shape: the `window` largest visible entries of each row."""
    seqlen_k = bias.shape[-1]
    if bias.dtype.kind != "f":
        bias = bias.astype(xp.float32)  # bfloat16 (ml_dtypes) has no finfo; float32 holds it
    # Visible scores are clipped to the finite minimum so that every visible key (even one
    # with bias -inf) ranks above every hidden key (score -inf).
    lowest = xp.finfo(bias.dtype).min
    scores = xp.where(visible, xp.maximum(bias, lowest), -xp.inf)
    # Descending order; the stable sort breaks ties toward the earlier key on both backends.
    chosen = xp.argsort(-scores, axis=-1, kind="stable")[..., :window]
    rows = chosen.size // window
    # Scatter into a flat view: row r's key j sits at r * Sk + j.
    flat_index = xp.arange(rows)[:, None] * seqlen_k + chosen.reshape(rows, window)
    keep = xp.zeros(bias.size, dtype=bool)
    keep[flat_index.ravel()] = True
    return keep.reshape(bias.shape)


def _smooth_to_blocks(keep, block: int, xp: ModuleType):
    """Keep whole blocks of `block` keys where more than half of the block was kept."""
    seqlen_k = keep.shape[-1]
    blocks = -(-seqlen_k // block)  # ceil(Sk / block)
    padded = xp.zeros(keep.shape[:-1] + (blocks * block,), dtype=bool)
    padded[..., :seqlen_k] = keep
    kept_per_block = padded.reshape(keep.shape[:-1] + (blocks, block)).sum(axis=-1)
    lengths = xp.minimum(block, seqlen_k - block * xp.arange(blocks))  # last block may be short
    block_kept = 2 * kept_per_block > lengths  # more than half of the block's own length
    return xp.repeat(block_kept, block, axis=-1)[..., :seqlen_k]


def topk_mask(bias, window: int, causal: bool, block: int | None, mask, xp: ModuleType):
    """Inputs are validated by the public dmattn_cupy.topk_mask."""
    visible = _visible_keys(bias, mask, causal, xp)
    keep = _largest_visible(bias, visible, window, xp)
    if block is not None:
        keep = _smooth_to_blocks(keep, block, xp)
    return keep & visible
