"""Tile and launch configuration: pure functions of sizes, printable and testable without a GPU.

Mirrors kernels_cu/tile_traits.cuh (FwdTraits), the shared-memory carve-ups at the top of
kernels_cu/fwd.cu (mma.sync), kernels_cu/fwd_wgmma.cu (Hopper, narrow: WgmmaFwdTraits),
kernels_cu/fwd_ws.cu (Hopper, wide: WsFwdTraits) and kernels_cu/fwd_decode.cu (DecodeTraits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TILE_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
WGMMA_HEAD_DIMS = (64, 128)
# Tile head dims where the Hopper forward runs wide (fwd_ws.cu: 128 x 128 tiles) when it fits.
WGMMA_WIDE_HEAD_DIMS = (128,)
WIDE_BLOCK_N = 128  # keys per tile of the wide kernel (its K/V TMA boxes)
WGMMA_V_STAGES = 2  # fwd_wgmma.cu, WgmmaFwdTraits::kVStages; fwd_ws.cu, WsFwdTraits::kVStages
THREADS = 128  # one warpgroup: fwd_kernel, fwd_combine_kernel, the narrow Hopper kernel
# fwd_ws.cu (WsFwdTraits): a producer warpgroup and two consumers; Q tiles in flight, the items
# handed on ahead and the mbarriers (a full and an empty one per slot of the Q, K, V, aux and item
# rings).
WS_THREADS = 3 * THREADS
WS_Q_STAGES = 1
WS_ITEM_SLOTS = 2
WS_BARRIERS = 2 * (WS_Q_STAGES + 2 * 2 + WGMMA_V_STAGES + WS_ITEM_SLOTS)
# Shared memory one CTA may use with two CTAs resident per multiprocessor (sm_80/sm_90: 227 KiB
# usable per SM, 1 KiB reserved per CTA), and alone.
SMEM_PER_CTA_FOR_TWO = 113 * 1024
SMEM_PER_CTA = 227 * 1024


def tile_head_dim(head_dim: int) -> int:
    """The smallest tile that holds head_dim (extra columns are zero-filled, never stored)."""
    for tile in TILE_HEAD_DIMS:
        if head_dim <= tile:
            return tile
    raise ValueError(f"head_dim must be <= {TILE_HEAD_DIMS[-1]}; got {head_dim}")


def aux_row_bytes(block_n: int, elem_bytes: int) -> int:
    return block_n * elem_bytes + 16 if elem_bytes else 0


@dataclass(frozen=True)
class FwdTiles:
    head_dim: int     # tile head dim
    block_m: int      # query-tile rows (pack heads x block_m / pack sequence rows)
    block_n: int      # key-tile columns
    wgmma: bool       # Hopper warpgroup tiles (kernels_cu/tile_mma.cuh, WgmmaTiles)
    warpgroups: int = 1  # Hopper: 1 (narrow, fwd_wgmma.cu) or 2 (wide, fwd_ws.cu: 128 x 128 tiles)

    @classmethod
    def for_head_dim(cls, head_dim: int, has_aux: bool, wgmma: bool, warpgroups: int = 1) -> "FwdTiles":
        """Mirrors MmaSyncTiles (FwdTraits<HEAD_DIM, HAS_AUX>), WgmmaFwdTraits and WsFwdTraits.

        has_aux: a mask or a bias is read. wgmma: the GPU is a Hopper (sm_90) and the tile head
        dim is 64 or 128 — then each of `warpgroups` computing warpgroups takes 64 rows against
        64-key (narrow, kernels_cu/fwd_wgmma.cu) or 128-key (wide, kernels_cu/fwd_ws.cu) tiles.
        """
        tile = tile_head_dim(head_dim)
        if wgmma and tile in WGMMA_HEAD_DIMS:
            return cls(tile, 64 * warpgroups, WIDE_BLOCK_N // 2 * warpgroups, True, warpgroups)
        block_n = 64 if tile <= 64 or (tile == 128 and not has_aux) else 32
        return cls(tile, 128 if tile <= 128 else 64, block_n, False)

    @property
    def threads(self) -> int:
        return WS_THREADS if self.warpgroups == 2 else THREADS

    @property
    def k_stages(self) -> int:
        """Hopper: K and mask/bias slots (WgmmaFwdTraits::kKStages, WsFwdTraits::kKStages)."""
        return 3 if self.warpgroups == 1 else 2

    def tile_bytes(self, rows: int) -> int:
        """Shared-memory bytes of a rows x head_dim tile of Q, K or V."""
        return rows * self.head_dim * 2 if self.wgmma else rows * (self.head_dim + 8) * 2


@dataclass(frozen=True)
class FwdConfig:
    tiles: FwdTiles
    pack: int             # query heads of one GQA group per CTA
    m_blocks: int         # query tiles per (batch, head group)
    num_splits: int       # key-range splits (> 1: partials merged by fwd_combine_kernel)
    tiles_per_split: int
    stages: int           # mma.sync kernel: key tiles in flight (2 or 3); the Hopper kernel's
                          # rings are fixed (WgmmaFwdTraits), this records its K slots
    smem_bytes: int


def choose_pack(group: int, block_m: int, shares_aux: bool) -> int:
    """Heads per CTA: the largest power of two dividing the GQA group with >= 16 rows per head.

    Packing is only possible when every head of the CTA reads the same mask and bias head
    (`shares_aux`: neither is per query head); then each K/V/mask/bias tile is loaded once.
    """
    if not shares_aux:
        return 1
    pack = 1
    while group % (pack * 2) == 0 and block_m // (pack * 2) >= 16:
        pack *= 2
    return pack


# Two CTAs are resident per multiprocessor; a grid of fewer than this many waves is split.
MIN_WAVES = 4
# Most key-range splits of one row (fwd.cu kMaxSplits: fwd_combine_kernel's weight buffer).
MAX_SPLITS = 256
MAX_COMBINE_THREADS = 512  # combine.cuh kMaxCombineThreads
WARP_COMBINE_SPLITS = 32   # combine.cuh kWarpCombineSplits: up to this many splits, a warp per row
COMBINE_WARPS = 8          # combine.cuh kCombineWarps: rows (warps) per CTA then


def combine_threads(splits: int, head_dim: int) -> int:
    """Threads of fwd_combine_kernel's CTA: COMBINE_WARPS warps (a row each) up to
    WARP_COMBINE_SPLITS splits; beyond, one CTA per row with about 8 partial loads per thread,
    all issued before the first is used; at least one thread per column pair, a whole number of
    warps, at most MAX_COMBINE_THREADS."""
    if splits <= WARP_COMBINE_SPLITS:
        return 32 * COMBINE_WARPS
    pairs = head_dim // 2
    want = max(pairs, math.ceil(splits * pairs / 8))
    return min(MAX_COMBINE_THREADS, 32 * math.ceil(want / 32))


def combine_blocks(splits: int, rows: int) -> int:
    """fwd_combine_kernel's grid: a row per warp up to WARP_COMBINE_SPLITS splits, else per CTA."""
    return math.ceil(rows / COMBINE_WARPS) if splits <= WARP_COMBINE_SPLITS else rows


def choose_splits(base_ctas: int, key_tiles: int, sm_count: int) -> tuple[int, int]:
    """(num_splits, tiles_per_split): split the keys when the grid is a few waves or less.

    With one or two waves the slowest CTA sets the time (under causal masking the last query
    tile has the most keys), and a grid smaller than the GPU leaves multiprocessors idle
    (decode). Splitting the key range into chunks of >= 8 tiles evens the work; the partials
    are merged by fwd_combine_kernel.
    """
    target = MIN_WAVES * 2 * sm_count
    if base_ctas >= target or key_tiles < 16:
        return 1, max(key_tiles, 1)
    splits = min(math.ceil(target / base_ctas), key_tiles // 8, MAX_SPLITS)
    if splits <= 1:
        return 1, key_tiles
    per_split = math.ceil(key_tiles / splits)
    return math.ceil(key_tiles / per_split), per_split


def use_wgmma(capability: int, head_dim: int, choice: str) -> bool:
    """The warpgroup kernel needs sm_90 and a tile head dim of 64 or 128; it is the default
    there ("auto" and "wgmma" agree), "sync" turns it off (see mma_choice)."""
    return capability == 90 and choice != "sync" and tile_head_dim(head_dim) in WGMMA_HEAD_DIMS


def fwd_config(*, head_dim: int, batch: int, heads: int, group: int, seqlen_q: int,
               seqlen_k: int, mask_bytes: int, bias_bytes: int, shares_aux: bool,
               sm_count: int, wgmma: bool = False, tma: bool = False, aux_vec: bool = True) -> FwdConfig:
    """tma: Q, K and V have tensor maps (tma.py), which the wide kernel needs; aux_vec: the mask and
    bias rows are 16-byte aligned runs (its cp.async copies)."""
    has_aux = mask_bytes + bias_bytes > 0
    if wgmma and tma and aux_vec and tile_head_dim(head_dim) in WGMMA_WIDE_HEAD_DIMS:
        wide = _fwd_config(FwdTiles.for_head_dim(head_dim, has_aux, True, 2), batch, heads, group,
                           seqlen_q, seqlen_k, mask_bytes, bias_bytes, shares_aux, sm_count)
        if wide.smem_bytes <= SMEM_PER_CTA:
            return wide
    return _fwd_config(FwdTiles.for_head_dim(head_dim, has_aux, wgmma), batch, heads, group,
                       seqlen_q, seqlen_k, mask_bytes, bias_bytes, shares_aux, sm_count)


def _fwd_config(tiles: FwdTiles, batch, heads, group, seqlen_q, seqlen_k, mask_bytes, bias_bytes,
                shares_aux, sm_count) -> FwdConfig:
    pack = choose_pack(group, tiles.block_m, shares_aux)
    seq_rows = tiles.block_m // pack
    m_blocks = math.ceil(seqlen_q / seq_rows)
    key_tiles = math.ceil(seqlen_k / tiles.block_n)
    splits, per_split = choose_splits(m_blocks * batch * heads // pack, key_tiles, sm_count)
    kv = tiles.tile_bytes(tiles.block_n)
    aux = seq_rows * (aux_row_bytes(tiles.block_n, mask_bytes) + aux_row_bytes(tiles.block_n, bias_bytes))
    bits = 4 * math.ceil(per_split / 32)  # one bit per key tile of a split (the mask scan)
    if tiles.warpgroups == 2:  # fwd_ws.cu: sQ[QS] | sK[2] | sV[2] | aux[2] | barriers | items | bits
        # an item's bits (fwd_ws.cu ItemBits): with a mask, active | partial | each row's map bits
        item_bits = bits * (2 + seq_rows if mask_bytes else 1)
        smem = (WS_Q_STAGES * tiles.tile_bytes(tiles.block_m) + tiles.k_stages * (kv + aux) + WGMMA_V_STAGES * kv
                + 8 * WS_BARRIERS + 4 * (WS_ITEM_SLOTS + 2) + WS_ITEM_SLOTS * item_bits)
        return FwdConfig(tiles, pack, m_blocks, splits, per_split, tiles.k_stages, smem)
    fixed = tiles.tile_bytes(tiles.block_m) + (bits if mask_bytes else 0)  # sQ, sBits
    if tiles.wgmma:  # fwd_wgmma.cu: sQ | sK[KS] | sV[2] | mask+bias[KS] | sBits
        smem = fixed + tiles.k_stages * (kv + aux) + WGMMA_V_STAGES * kv
        return FwdConfig(tiles, pack, m_blocks, splits, per_split, tiles.k_stages, smem)
    stage = math.ceil((2 * kv + aux) / 16) * 16                   # [K | V | mask | bias]
    stages = 3 if fixed + 3 * stage <= SMEM_PER_CTA_FOR_TWO else 2
    return FwdConfig(tiles, pack, m_blocks, splits, per_split, stages, fixed + stages * stage)


# ---- decode: kernels_cu/fwd_decode.cu (DecodeTraits) ----------------------------------------
DECODE_THREADS = 128
DECODE_MAX_ROWS = 16          # query rows per kv head (GQA group x Sq) one CTA holds
DECODE_MAX_SPLIT_KEYS = 4096  # keys per split at most (the CTA's live-key list)
DECODE_MIN_SPLIT_KEYS = 256   # fewer keys per CTA than this: its fixed latency dominates
# Partial values (splits x rows x head_dim) the last CTA of a kv head merges, at most (unless the
# keys need more splits): one CTA reads them, a warp per row, with ~16 loads in flight per lane.
DECODE_MERGE_FLOATS = 8192


def use_decode(group: int, seqlen_q: int, seqlen_k: int, has_mask: bool) -> bool:
    """Short queries under a mask (a kv head's rows fit one CTA) run the key-gathering decode
    kernel, as long as the keys fit MAX_SPLITS splits of DECODE_MAX_SPLIT_KEYS. Without a mask
    every key is live and the tile kernel's tensor cores win (H100: 30 against 63 us at 128K keys,
    400 against 1000 us with GQA 4 x 64 rows)."""
    return (has_mask and group * seqlen_q <= DECODE_MAX_ROWS
            and seqlen_k <= MAX_SPLITS * DECODE_MAX_SPLIT_KEYS)


def decode_batch(head_dim: int) -> int:
    """Live keys per step (DecodeTraits::kBatch): two K/V slots of this many rows."""
    return 64 if tile_head_dim(head_dim) <= 128 else 32


@dataclass(frozen=True)
class DecodeConfig:
    head_dim: int        # tile head dim (the template argument)
    keys_per_split: int  # a multiple of 64
    num_splits: int
    smem_bytes: int


def decode_config(*, head_dim: int, batch: int, kv_heads: int, rows: int, seqlen_k: int,
                  sm_count: int) -> DecodeConfig:
    """Splits the keys of each (batch, kv head): enough CTAs to fill the GPU twice over (a decode
    CTA is bound by memory latency, not by its multiprocessor), but few enough that the last CTA
    merges at most DECODE_MERGE_FLOATS partial values of its `rows` rows, and with at least
    DECODE_MIN_SPLIT_KEYS and at most DECODE_MAX_SPLIT_KEYS keys each."""
    tile = tile_head_dim(head_dim)
    splits = min(math.ceil(2 * sm_count / (batch * kv_heads)), math.ceil(seqlen_k / DECODE_MIN_SPLIT_KEYS),
                 MAX_SPLITS, max(1, DECODE_MERGE_FLOATS // (rows * head_dim)))
    per_split = 64 * math.ceil(math.ceil(seqlen_k / max(splits, 1)) / 64)
    per_split = min(per_split, DECODE_MAX_SPLIT_KEYS)
    bk = decode_batch(head_dim)
    smem = (DECODE_MAX_ROWS * tile * 4              # sQ
            + 2 * 2 * bk * (tile + 8) * 2           # ring: 2 x [K | V]
            + DECODE_MAX_ROWS * bk * 4              # sS
            + DECODE_MAX_ROWS * (4 + 8)             # sAlpha, sStat
            + (DECODE_THREADS // 32 + 1) * 4)       # sScan
    smem += DECODE_MAX_SPLIT_KEYS // 8 + DECODE_MAX_SPLIT_KEYS * 4  # sLive, sKeys
    return DecodeConfig(tile, per_split, math.ceil(seqlen_k / per_split), smem)
