"""Backward tile and launch configuration: pure functions of sizes, testable without a GPU.

Mirrors kernels_cu/bwd_tiles.cuh (BwdTraits, bwd_buffer_bytes) and the shared-memory carve-up at
the top of kernels_cu/bwd.cu.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import aux_row_bytes, tile_head_dim

THREADS = 128


@dataclass(frozen=True)
class BwdTiles:
    head_dim: int   # tile head dim
    block_m: int    # query rows per step
    block_n: int    # keys per CTA
    d_split: int    # CTAs along the head dim (each owns head_dim / d_split output columns)

    @classmethod
    def for_head_dim(cls, head_dim: int) -> BwdTiles:
        tile = tile_head_dim(head_dim)
        d_split = 2 if tile > 128 else 1
        d_out = tile // d_split
        return cls(tile, 64 if d_out <= 64 else 32 if d_out <= 96 else 16, 64, d_split)


@dataclass(frozen=True)
class BwdConfig:
    tiles: BwdTiles
    m_tiles: int          # query tiles
    n_tiles: int          # key tiles (grid x)
    smem_bytes: int
    dq_semaphores: int    # deterministic mode: counters of dq_accum turns
    db_semaphores: int    # deterministic mode: counters of dbias_accum turns


def bwd_config(*, head_dim: int, batch: int, group: int, kv_heads: int, seqlen_q: int,
               seqlen_k: int, mask_bytes: int, bias_bytes: int, bias_rows_reduced: bool,
               dbias_atomic: bool) -> BwdConfig:
    tiles = BwdTiles.for_head_dim(head_dim)
    bm, bn, stride = tiles.block_m, tiles.block_n, tiles.head_dim + 8
    m_tiles = math.ceil(seqlen_q / bm)
    n_tiles = math.ceil(seqlen_k / bn)
    buffer = (2 * bm * stride * 2 + bm * aux_row_bytes(bn, mask_bytes)
              + bm * aux_row_bytes(bn, bias_bytes) + 2 * bm * 4)
    smem = 2 * buffer + 2 * bn * stride * 2 + bn * (bm + 8) * 2      # buf[2], sK, sV, sdS
    if bias_bytes:
        smem += 4 * (group * bn if bias_rows_reduced else bm * (bn + 4))  # sColSum | sDb
    if mask_bytes:
        smem += 4 * math.ceil(group * m_tiles / 32)                    # sBits
    dq_sems = tiles.d_split * batch * kv_heads * m_tiles
    db_sems = n_tiles * batch * kv_heads * (1 if bias_rows_reduced else m_tiles) if dbias_atomic else 0
    return BwdConfig(tiles, m_tiles, n_tiles, smem, dq_sems, db_sems)
