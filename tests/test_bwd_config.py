"""The backward's launch configuration (dmattn_cupy/_cuda/bwd_config.py), without a GPU.

The tile shapes must match kernels_cu/bwd_tiles.cuh exactly (the launch passes the thread count
and the shared-memory bytes the kernel carves up): a host program compiled with nvcc prints
BwdTraits and BwdSmem for every tile head dim, mask/bias element size and product kind.
"""

from __future__ import annotations

import itertools
import shutil

import pytest
from host_program import run_host_program

from dmattn_cupy._cuda.bwd_config import (CTA_OVERHEAD_STEPS, BwdTiles, bwd_config, chunk_works, first_query_tile,
                                          schedule_makespan)
from dmattn_cupy._cuda.config import TILE_HEAD_DIMS, WGMMA_HEAD_DIMS

MASK_BYTES = (0, 1, 2, 4)
BIAS_BYTES = (0, 2, 4)
SMEM_LIMIT = 227 * 1024  # opt-in shared memory per CTA on sm_80 / sm_90
H100_SMS = 132


def _config(**kw):
    base = dict(head_dim=64, batch=1, heads=2, kv_heads=1, seqlen_q=4096, seqlen_k=4096,
                mask_bytes=1, bias_bytes=2, bias_rows_reduced=False, dbias_atomic=False,
                dbias_sharers=1, causal=True, sm_count=H100_SMS)
    return bwd_config(**{**base, **kw})


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_tiles_match_the_header(tmp_path):
    combos = [(d, mb, bb, w) for d, mb, bb in itertools.product(TILE_HEAD_DIMS, MASK_BYTES, BIAS_BYTES)
              for w in ((False, True) if d in WGMMA_HEAD_DIMS else (False,))]
    lines = []
    for d, mb, bb, w in combos:
        tr = f"dmattn::BwdTraits<{d}, {mb + bb}, {str(w).lower()}>"
        sm = f"dmattn::BwdSmem<dmattn::BwdMmaFor<dmattn::bf16_t, {tr}, {str(w).lower()}>::type, {mb}, {bb}>"
        lines.append(
            f'  printf("{d} {mb} {bb} {int(w)} %d %d %d %d %d %d %d\\n", {tr}::kBlockM, {tr}::kBlockN, '
            f"{tr}::kWarps, {tr}::kDSplit, {tr}::kMinBlocks, {tr}::kDqWarps, {sm}::kFixed);")
    out = run_host_program(tmp_path, ["bwd_mma.cuh", "bwd_tiles.cuh"], lines)
    assert len(out) == len(combos)
    for line in out:
        d, mb, bb, w, bm, bn, warps, d_split, per_sm, dq_warps, fixed = map(int, line.split())
        t = BwdTiles.for_head_dim(d, mb + bb, bool(w))
        got = (t.block_m, t.block_n, t.warps, t.d_split, t.max_ctas_per_sm, t.dq_warps)
        assert got == (bm, bn, warps, d_split, per_sm, dq_warps), (d, mb, bb, w)
        assert t.fixed_smem_bytes(mb, bb) == fixed, (d, mb, bb, w)


@pytest.mark.parametrize("head_dim", TILE_HEAD_DIMS)
def test_shared_memory_fits_every_element_size(head_dim):
    """Long sequences and wide groups (the mask bits grow with both) still fit a CTA."""
    for mb, bb, rows_reduced in itertools.product(MASK_BYTES, BIAS_BYTES, (False, True)):
        if rows_reduced and not bb:
            continue
        for wgmma in (False, True):
            cfg = _config(head_dim=head_dim, heads=16, kv_heads=1, seqlen_q=131072, seqlen_k=131072,
                          mask_bytes=mb, bias_bytes=bb, bias_rows_reduced=rows_reduced, wgmma=wgmma)
            assert cfg.smem_bytes <= SMEM_LIMIT, (head_dim, mb, bb, rows_reduced, wgmma, cfg.smem_bytes)


def test_target_tiles():
    """D = 64: 8 warps x 64 query rows x 128 keys; D = 128: 8 warps x 32 rows x 128 keys."""
    t64, t128 = BwdTiles.for_head_dim(64, 3), BwdTiles.for_head_dim(128, 3)
    assert (t64.block_m, t64.block_n, t64.threads) == (64, 128, 256)
    assert (t128.block_m, t128.block_n, t128.threads) == (32, 128, 256)
    assert BwdTiles.for_head_dim(64, 8).block_m == 32  # float32 mask and bias


def test_hopper_tiles_where_they_fit():
    """The warpgroup products take 64-row steps at D = 64 and 128 (gqa8k_topk's shape fits in
    231 KiB with bool mask + bf16 bias); a float32 bias at D = 128, or a mask scan too long for
    the remaining bytes, falls back to the mma.sync tiles."""
    gqa = dict(head_dim=128, batch=2, heads=16, kv_heads=4, seqlen_q=8192, seqlen_k=8192, wgmma=True)
    cfg = _config(**gqa)
    assert cfg.tiles.wgmma and cfg.tiles.block_m == 64 and cfg.smem_bytes <= SMEM_LIMIT
    assert SMEM_LIMIT - cfg.smem_bytes < 2048  # the unpadded, swizzled mask/bias rows are needed
    assert not _config(**{**gqa, "bias_bytes": 4}).tiles.wgmma
    assert not _config(**{**gqa, "seqlen_q": 131072, "seqlen_k": 131072}).tiles.wgmma
    assert _config(**{**gqa, "mask_bytes": 0, "bias_bytes": 0, "seqlen_q": 131072}).tiles.wgmma
    seed = _config(head_dim=64, seqlen_q=16384, seqlen_k=16384, wgmma=True)
    assert seed.tiles.wgmma and (seed.tiles.block_m, seed.tiles.block_n) == (64, 128)
    for head_dim in (32, 96, 192, 256):  # no warpgroup tiles there
        assert not _config(head_dim=head_dim, wgmma=True).tiles.wgmma
    assert not _config(wgmma=False).tiles.wgmma


def test_one_kv_head_is_cut_into_chunks():
    """seed_16k: 128 key tiles of one kv head are too few CTAs for 132 multiprocessors; the chunk
    length is the schedule model's best (H100: 127-128 query tiles, 1.00 ms against 1.20 at 32)."""
    cfg = _config(seqlen_q=16384, seqlen_k=16384)
    assert cfg.n_tiles == 128 and cfg.chunks > 1 and cfg.chunk_tiles < cfg.m_tiles
    kw = dict(tiles=cfg.tiles, m_tiles=cfg.m_tiles, n_tiles=cfg.n_tiles, ctas_per_tile=1, group=2,
              seqlen_q=16384, seqlen_k=16384, causal=True)
    best = schedule_makespan(chunk_works(cfg.chunk_tiles, **kw), H100_SMS)
    for length in (8, 32, 64, 96, 170, cfg.m_tiles):
        assert best <= schedule_makespan(chunk_works(length, **kw), H100_SMS)
    assert 120 <= cfg.chunk_tiles <= 130


def test_chunk_works_cover_every_step_once():
    """Each (key tile, query tile, head) step is in exactly one CTA, in launch order."""
    tiles = _config().tiles
    for causal in (False, True):
        for length in (8, 13, 64, 100):
            works = chunk_works(length, tiles=tiles, m_tiles=100, n_tiles=40, ctas_per_tile=3, group=2,
                                seqlen_q=6400, seqlen_k=5120, causal=causal)
            steps = sum(w - CTA_OVERHEAD_STEPS for w in works if w) / 3
            visible = sum(100 - first_query_tile(n, tiles=tiles, m_tiles=100, seqlen_q=6400, seqlen_k=5120,
                                                 causal=causal) for n in range(40))
            assert steps == 2 * visible


def test_schedule_makespan_starts_each_cta_on_the_first_free_slot():
    assert schedule_makespan([3, 1, 1, 1], 2) == 3
    assert schedule_makespan([1, 1, 1, 3], 2) == 4  # the long one starts last
    assert schedule_makespan([2] * 6, 3) == 4


def test_many_ctas_are_not_cut():
    """gqa8k: 64 key tiles x 8 (batch, kv head) pairs fill several waves as they are."""
    cfg = _config(head_dim=128, batch=2, heads=16, kv_heads=4, seqlen_q=8192, seqlen_k=8192)
    assert cfg.chunks == 1 and cfg.chunk_tiles == cfg.m_tiles
    assert cfg.grid == (1, cfg.n_tiles)


def test_row_broadcast_dbias_is_never_cut():
    """Its column sums span all rows: chunks would share the dbias cells."""
    cfg = _config(seqlen_q=16384, seqlen_k=16384, bias_rows_reduced=True)
    assert cfg.chunks == 1


def test_deterministic_turn_words():
    """Only shared dbias tiles take turns (dQ adds in fixed point): one bit per sharing CTA for
    each (key tile, query tile)."""
    assert _config(head_dim=128, batch=2, heads=16, kv_heads=4, seqlen_q=8192, seqlen_k=8192).db_turn_words == 0
    shared = _config(batch=3, kv_heads=1, dbias_atomic=True, dbias_sharers=3)
    assert shared.db_turn_words == shared.n_tiles * 3 * shared.m_tiles
