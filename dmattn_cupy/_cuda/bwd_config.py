"""Backward tile and launch configuration: pure functions of sizes, testable without a GPU.

Mirrors kernels_cu/bwd_tiles.cuh (BwdTraits, BwdSmem) and the tile layouts of kernels_cu/bwd_mma.cuh.
"""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass

from .config import SMEM_PER_CTA, WGMMA_HEAD_DIMS, aux_row_bytes, tile_head_dim

THREADS = 128         # bwd_preprocess_kernel, bwd_convert_dq_kernel
# Query chunks (bwd.cu): a grid of fewer than CHUNK_BELOW_WAVES waves of CTAs cuts every key tile's
# query range into chunks (seed_16k: 128 key tiles of one kv head, of very different lengths under
# a causal mask, on 132 multiprocessors). The chunk length is the one whose launch, replayed by
# schedule_makespan (CTAs start in launch order on the first free slot), finishes first: the time
# is non-monotonic in the length (H100 seed_16k backward: L = 32 1.20 ms, 64 1.25, 96 1.47, 127
# 1.00, 256 1.84), and the model, with CTA_OVERHEAD_STEPS per CTA, reproduced those within a few
# percent (NOTES 42). From 2 waves on, the launch order (heaviest key tiles of every (batch, kv
# head) first) balances the load by itself (gqa8k: 512 CTAs). A chunk has at least
# MIN_CHUNK_TILES query tiles: each one costs a K/V load and an fp32 dK, dV partial.
CHUNK_BELOW_WAVES = 2
MIN_CHUNK_TILES = 8
CTA_OVERHEAD_STEPS = 6     # a CTA's fixed cost (K/V, mask scan, dK/dV out) in steps of the loop
MAX_CHUNK_CANDIDATES = 64  # chunk lengths tried: the longest key tile's range cut in 1..64 parts
SMEM_PER_SM = 228 * 1024   # sm_80 / sm_90, of which 1 KiB is reserved per CTA
SCALAR_BYTES = 80          # BwdSmem::kScalarBytes: BwdScalars (batch pointers, head divisions, chunk flag)


@dataclass(frozen=True)
class BwdTiles:
    head_dim: int   # tile head dim
    block_m: int    # query rows per step
    block_n: int    # keys per CTA (16 per warp)
    d_split: int    # CTAs along the head dim (each owns head_dim / d_split output columns)
    warps: int
    max_ctas_per_sm: int    # as registers allow (__launch_bounds__ minimum blocks)
    dq_warps: int   # warps that compute the dQ tile
    wgmma: bool = False     # Hopper warpgroup products (kernels_cu/bwd_mma.cuh, BwdWgmma)

    @classmethod
    def for_head_dim(cls, head_dim: int, aux_bytes: int, wgmma: bool = False) -> BwdTiles:
        """aux_bytes: bytes of one mask element plus one bias element (BwdTraits' AUX_BYTES).
        wgmma: the Hopper products, for tile head dims 64 and 128 (64 query rows per step)."""
        tile = tile_head_dim(head_dim)
        wgmma = wgmma and tile in WGMMA_HEAD_DIMS
        d_split = 2 if tile > 128 else 1
        d_out = tile // d_split
        warps = 8 if d_split == 1 else 4
        if wgmma:
            block_m = 64
        else:
            block_m = 64 if d_out <= 64 and aux_bytes <= 4 else 32 if (d_split == 1 or d_out <= 96) else 16
        warps_m = block_m // 16
        pairs = d_out // 16          # 16-column pairs of the dQ tile
        warps_d = max(d for d in range(1, warps // warps_m + 1) if pairs % d == 0)
        return cls(tile, block_m, 16 * warps, d_split, warps, 1 if d_split == 1 else 2, warps_m * warps_d,
                   wgmma)

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def tile_bytes(self, rows: int) -> int:
        """A Q/dO/K/V tile: swizzled slabs (wgmma) or rows padded by 16 bytes."""
        return rows * self.head_dim * 2 if self.wgmma else rows * (self.head_dim + 8) * 2

    def aux_row_bytes(self, elem_bytes: int) -> int:
        """A mask or bias tile row (AuxRows): unpadded and swizzled with wgmma."""
        if not elem_bytes:
            return 0
        return self.block_n * elem_bytes if self.wgmma else aux_row_bytes(self.block_n, elem_bytes)

    def fixed_smem_bytes(self, mask_bytes: int, bias_bytes: int) -> int:
        """BwdSmem::kFixed: sK, sV, sdS, sQ[2], sdO[2], sMask[2], sBias[2], sLse[2], sDelta[2],
        scalars."""
        bm, bn = self.block_m, self.block_n
        ds = bn * bm * 2 if self.wgmma else bn * (bm + 8) * 2
        return (2 * self.tile_bytes(bn) + ds + 4 * self.tile_bytes(bm)
                + 2 * bm * (self.aux_row_bytes(mask_bytes) + self.aux_row_bytes(bias_bytes))
                + 4 * bm * 4 + SCALAR_BYTES)


@dataclass(frozen=True)
class BwdConfig:
    tiles: BwdTiles
    m_tiles: int          # query tiles
    n_tiles: int          # key tiles (grid z)
    chunk_tiles: int      # query tiles per chunk (m_tiles: key tiles are not cut)
    chunks: int           # chunks of the longest key tile (grid y / d_split)
    smem_bytes: int
    db_turn_words: int    # deterministic mode: ordering bits of the shared dbias_accum tiles

    @property
    def grid(self) -> tuple[int, int]:
        """(grid y, grid z) = (chunks x head-dim parts, key tiles); grid x is batch * kv_heads."""
        return self.chunks * self.tiles.d_split, self.n_tiles


def first_query_tile(n: int, *, tiles: BwdTiles, m_tiles: int, seqlen_q: int, seqlen_k: int,
                     causal: bool) -> int:
    """The first query tile that key tile n can see (bwd.cu: m_begin)."""
    if not causal:
        return 0
    return min(m_tiles, max(0, n * tiles.block_n - seqlen_k + seqlen_q) // tiles.block_m)


def schedule_makespan(works, slots: int) -> float:
    """When the last of CTAs with these costs, launched in this order, finishes on `slots`
    resident CTA slots: each starts on the first slot to free up (in-order block dispatch)."""
    free = [0.0] * slots
    for work in works:
        heapq.heapreplace(free, free[0] + work)
    return max(free)


def chunk_works(chunk_tiles: int, *, tiles: BwdTiles, m_tiles: int, n_tiles: int, ctas_per_tile: int,
                group: int, seqlen_q: int, seqlen_k: int, causal: bool) -> list[float]:
    """The cost, in steps (one query tile x head), of each CTA of the grid in launch order (grid x
    = batch, kv head and head-dim part fastest, then the chunk, then the key tile), every query
    tile taken as active (the mask is not known here); chunks past a key tile's last exit at once."""
    begins = [first_query_tile(n, tiles=tiles, m_tiles=m_tiles, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                               causal=causal) for n in range(n_tiles)]
    chunks = max(1, max(math.ceil((m_tiles - m0) / chunk_tiles) for m0 in begins))
    works = []
    for m0 in begins:
        for c in range(chunks):
            hi = m_tiles - c * chunk_tiles
            lo = max(m0, hi - chunk_tiles)
            work = CTA_OVERHEAD_STEPS + group * (hi - lo) if hi > lo or c == 0 else 0.0
            works.extend([work] * ctas_per_tile)
    return works


def choose_chunk_tiles(*, tiles: BwdTiles, m_tiles: int, n_tiles: int, ctas_per_tile: int, group: int,
                       seqlen_q: int, seqlen_k: int, causal: bool, slots: int, can_chunk: bool) -> int:
    """Query tiles per chunk: m_tiles (no cut) when the grid has CHUNK_BELOW_WAVES waves of `slots`
    resident CTAs already, else the length whose schedule finishes first (the longest on ties)."""
    if not can_chunk or n_tiles * ctas_per_tile >= CHUNK_BELOW_WAVES * slots or m_tiles < 2 * MIN_CHUNK_TILES:
        return m_tiles
    longest = m_tiles - first_query_tile(0, tiles=tiles, m_tiles=m_tiles, seqlen_q=seqlen_q,
                                         seqlen_k=seqlen_k, causal=causal)
    candidates = {m_tiles} | {max(MIN_CHUNK_TILES, math.ceil(longest / parts))
                              for parts in range(1, MAX_CHUNK_CANDIDATES + 1)}
    kw = dict(tiles=tiles, m_tiles=m_tiles, n_tiles=n_tiles, ctas_per_tile=ctas_per_tile, group=group,
              seqlen_q=seqlen_q, seqlen_k=seqlen_k, causal=causal)
    return min(sorted(candidates, reverse=True),
               key=lambda length: schedule_makespan(chunk_works(length, **kw), slots))


@functools.lru_cache(maxsize=256)
def bwd_config(*, head_dim: int, batch: int, heads: int, kv_heads: int, seqlen_q: int,
               seqlen_k: int, mask_bytes: int, bias_bytes: int, bias_rows_reduced: bool,
               dbias_atomic: bool, dbias_sharers: int, causal: bool, sm_count: int,
               wgmma: bool = False) -> BwdConfig:
    """`dbias_sharers`: CTAs of one key tile that add into the same dbias_accum cells (batch
    and/or kv heads a broadcast bias spans; 1 when dbias has one writer). `wgmma`: use the Hopper
    products where the tile head dim has them and their tiles fit in shared memory."""
    group = heads // kv_heads

    def smem_bytes(tiles: BwdTiles) -> int:
        bm, bn = tiles.block_m, tiles.block_n
        smem = tiles.fixed_smem_bytes(mask_bytes, bias_bytes)
        if bias_bytes:
            smem += 4 * (group * bn if bias_rows_reduced else bm * (bn + 4))  # sColSum | sDb
        if mask_bytes:
            smem += 4 * math.ceil(group * math.ceil(seqlen_q / bm) / 32)     # sBits
        return smem

    tiles = BwdTiles.for_head_dim(head_dim, mask_bytes + bias_bytes, wgmma)
    if tiles.wgmma and smem_bytes(tiles) > SMEM_PER_CTA:  # e.g. float32 bias, or very long Sq
        tiles = BwdTiles.for_head_dim(head_dim, mask_bytes + bias_bytes)
    smem = smem_bytes(tiles)
    bm, bn = tiles.block_m, tiles.block_n
    m_tiles = math.ceil(seqlen_q / bm)
    n_tiles = math.ceil(seqlen_k / bn)
    resident = max(1, min(tiles.max_ctas_per_sm, SMEM_PER_SM // (smem + 1024)))
    # A row-broadcast dbias is one column sum per key tile: its chunks would share the cells.
    chunk_tiles = choose_chunk_tiles(
        tiles=tiles, m_tiles=m_tiles, n_tiles=n_tiles, ctas_per_tile=batch * kv_heads * tiles.d_split,
        group=group, seqlen_q=seqlen_q, seqlen_k=seqlen_k, causal=causal, slots=sm_count * resident,
        can_chunk=not (bias_bytes and bias_rows_reduced))
    chunks = math.ceil(m_tiles / chunk_tiles)
    db_words = 0
    if dbias_atomic:
        db_words = (n_tiles * batch * kv_heads * (1 if bias_rows_reduced else m_tiles)
                    * math.ceil(dbias_sharers / 32))
    return BwdConfig(tiles, m_tiles, n_tiles, chunk_tiles, chunks, smem, db_words)
