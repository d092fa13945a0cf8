"""The forward's launch configuration (dmattn_cupy/_cuda/config.py), without a GPU."""

from __future__ import annotations

import pytest

from dmattn_cupy._cuda.compile import kernels_dir
from dmattn_cupy._cuda.config import (COMBINE_WARPS, DECODE_MAX_ROWS, DECODE_MAX_SPLIT_KEYS, DECODE_MERGE_FLOATS,
                                      DECODE_THREADS, MAX_COMBINE_THREADS, MAX_SPLITS, SMEM_PER_CTA,
                                      SMEM_PER_CTA_FOR_TWO, WARP_COMBINE_SPLITS, combine_blocks,
                                      combine_threads, decode_batch, decode_config, fwd_config, use_decode)

H100_SMS = 132


def _config(**kw):
    base = dict(head_dim=128, batch=2, heads=16, group=4, seqlen_q=8192, seqlen_k=8192,
                mask_bytes=0, bias_bytes=0, shares_aux=True, sm_count=H100_SMS, wgmma=True, tma=True)
    return fwd_config(**{**base, **kw})


def test_wide_needs_tensor_maps_and_aligned_rows():
    """The wide kernel (fwd_ws.cu) copies Q, K and V by TMA and mask/bias rows by bulk copies:
    without the tensor maps (a stride TMA cannot express, or DMATTN_CUPY_TMA=0) or with mask/bias
    rows that are not 16-byte aligned runs, the narrow kernel runs."""
    assert _config().tiles.warpgroups == 2
    assert _config(tma=False).tiles.warpgroups == 1
    assert _config(mask_bytes=1, bias_bytes=2, aux_vec=False).tiles.warpgroups == 1


def test_hopper_runs_wide_at_d128_when_it_fits():
    dense = _config()
    assert (dense.tiles.warpgroups, dense.tiles.block_m, dense.tiles.block_n) == (2, 128, 128)
    assert dense.tiles.threads == 384 and dense.stages == 2 and dense.pack == 4  # producer + 2 consumers
    # a bias shared by the GQA group: 4 heads x 32 rows, its rows still fit
    biased = _config(bias_bytes=2)
    assert biased.tiles.warpgroups == 2 and biased.smem_bytes <= SMEM_PER_CTA
    # per-query-head fp32 bias: 128 bias rows of 128 keys do not fit; narrow instead
    per_head = _config(bias_bytes=4, shares_aux=False)
    assert (per_head.tiles.warpgroups, per_head.tiles.block_n, per_head.stages) == (1, 64, 3)
    # mask + bias shared by the heads of a tile: 32 rows (group 4) or 64 (group 2) in two slots fit
    for group in (4, 2):
        masked = _config(mask_bytes=1, bias_bytes=2, group=group)
        assert masked.tiles.warpgroups == 2 and masked.smem_bytes <= SMEM_PER_CTA, group
    # 128 rows per tile (group 1): two slots of mask + bias rows, or of a 4-byte mask, do not fit
    assert _config(mask_bytes=1, bias_bytes=2, group=1).tiles.warpgroups == 1
    assert _config(mask_bytes=4, shares_aux=False).tiles.warpgroups == 1


def test_wide_item_slots_hold_each_rows_map_bits():
    """With a mask, each item slot holds every row's block-map bits over the split's key tiles
    (fwd_ws.cu ItemBits): 64 rows (group 2) of 896 tiles still fit beside the mask and bias rows,
    of 1024 tiles no longer (the narrow kernel runs); 16 rows (group 8) fit at a million keys."""
    fits = _config(mask_bytes=1, bias_bytes=2, group=2, seqlen_k=896 * 128)
    assert fits.tiles.warpgroups == 2 and fits.smem_bytes <= SMEM_PER_CTA
    assert _config(mask_bytes=1, bias_bytes=2, group=2, seqlen_k=1024 * 128).tiles.warpgroups == 1
    packed = _config(mask_bytes=1, bias_bytes=2, group=8, seqlen_k=1 << 20)
    assert packed.tiles.warpgroups == 2 and packed.smem_bytes <= SMEM_PER_CTA
    unmasked = _config(bias_bytes=2, group=2, seqlen_k=1024 * 128)
    assert unmasked.tiles.warpgroups == 2


def test_mma_sync_and_narrow_d64_keep_two_ctas_per_sm():
    for d in (32, 64, 96, 128):  # larger head dims: one CTA (its K/V tiles alone fill half)
        cfg = _config(head_dim=d, wgmma=False, mask_bytes=1, bias_bytes=2, shares_aux=False)
        assert cfg.tiles.warpgroups == 1 and cfg.smem_bytes <= SMEM_PER_CTA_FOR_TWO, d
    narrow = _config(head_dim=64, mask_bytes=1, bias_bytes=2, shares_aux=False)
    assert narrow.tiles.warpgroups == 1 and narrow.smem_bytes <= SMEM_PER_CTA_FOR_TWO


@pytest.mark.parametrize("seqlen_k", [4096, 131072, 1 << 20])
def test_decode_splits_stay_within_the_combine_buffer(seqlen_k):
    cfg = _config(head_dim=64, batch=1, heads=2, group=2, seqlen_q=1, seqlen_k=seqlen_k,
                  mask_bytes=1, bias_bytes=2)
    assert 1 < cfg.num_splits <= MAX_SPLITS
    assert cfg.num_splits * cfg.tiles_per_split >= -(-seqlen_k // cfg.tiles.block_n)


def test_combine_constants_match_the_kernel():
    source = (kernels_dir() / "combine.cuh").read_text()
    assert f"constexpr int kMaxSplits = {MAX_SPLITS};" in source
    assert f"constexpr int kMaxCombineThreads = {MAX_COMBINE_THREADS};" in source
    assert f"constexpr int kWarpCombineSplits = {WARP_COMBINE_SPLITS};" in source
    assert f"constexpr int kCombineWarps = {COMBINE_WARPS};" in source


@pytest.mark.parametrize("splits", [2, 3, 17, 32, 33, 256])
@pytest.mark.parametrize("head_dim", [8, 64, 80, 128, 256])
def test_combine_launch_covers_every_row(splits, head_dim):
    threads, rows = combine_threads(splits, head_dim), 1000
    blocks = combine_blocks(splits, rows)
    assert threads % 32 == 0 and threads <= MAX_COMBINE_THREADS
    if splits <= WARP_COMBINE_SPLITS:  # a warp per row: every row has a warp, no CTA is idle
        assert threads == 32 * COMBINE_WARPS and (blocks - 1) * COMBINE_WARPS < rows <= blocks * COMBINE_WARPS
    else:  # a CTA per row: a thread per column pair, about 8 partial loads per thread
        assert blocks == rows and head_dim // 2 <= threads
        assert threads <= max(32 * -(-head_dim // 64), 32 * -(-splits * head_dim // 512))


def test_decode_constants_match_the_kernel():
    source = (kernels_dir() / "fwd_decode.cu").read_text()
    assert f"kThreads = {DECODE_THREADS};" in source
    assert f"kMaxRows = {DECODE_MAX_ROWS};" in source
    assert f"kMaxSplitKeys = {DECODE_MAX_SPLIT_KEYS};" in source
    assert "kBatch = HEAD_DIM <= 128 ? 64 : 32;" in source
    assert (decode_batch(128), decode_batch(160)) == (64, 32)


def test_decode_takes_short_queries_only():
    assert use_decode(group=2, seqlen_q=1, seqlen_k=131072, has_mask=True)
    assert use_decode(group=8, seqlen_q=2, seqlen_k=5, has_mask=True)
    assert not use_decode(group=2, seqlen_q=1, seqlen_k=131072, has_mask=False)  # dense: tiles
    assert not use_decode(group=8, seqlen_q=4, seqlen_k=131072, has_mask=True)   # 32 rows per kv head
    assert not use_decode(group=1, seqlen_q=1, seqlen_k=MAX_SPLITS * DECODE_MAX_SPLIT_KEYS + 1, has_mask=True)


@pytest.mark.parametrize("seqlen_k", [1, 63, 1000, 70_000, 131_072, MAX_SPLITS * DECODE_MAX_SPLIT_KEYS])
@pytest.mark.parametrize("batch,kv_heads,rows", [(1, 1, 2), (2, 4, 16), (64, 8, 1)])
def test_decode_splits_cover_the_keys(seqlen_k, batch, kv_heads, rows):
    cfg = decode_config(head_dim=64, batch=batch, kv_heads=kv_heads, rows=rows, seqlen_k=seqlen_k,
                        sm_count=H100_SMS)
    assert cfg.keys_per_split % 64 == 0 and cfg.keys_per_split <= DECODE_MAX_SPLIT_KEYS
    assert 1 <= cfg.num_splits <= MAX_SPLITS
    assert (cfg.num_splits - 1) * cfg.keys_per_split < seqlen_k <= cfg.num_splits * cfg.keys_per_split
    # the last CTA merges a bounded volume unless the keys need more splits
    if seqlen_k <= DECODE_MAX_SPLIT_KEYS * DECODE_MERGE_FLOATS // (rows * 64):
        assert cfg.num_splits * rows * 64 <= max(DECODE_MERGE_FLOATS, rows * 64)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 160, 192, 256])
def test_decode_shared_memory_fits(head_dim):
    cfg = decode_config(head_dim=head_dim, batch=1, kv_heads=1, rows=16, seqlen_k=131072, sm_count=H100_SMS)
    assert cfg.smem_bytes <= SMEM_PER_CTA_FOR_TWO
