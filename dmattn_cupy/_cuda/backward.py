"""Backward launcher: dq, dk, dv (and dbias) from dout and the forward's out, lse.

Three launches on CuPy's current stream (kernels_cu/bwd.cu), four in deterministic mode:
  bwd_kv_bound_kernel    deterministic: max |K| and max ||V_j||, the bound of fixed-point dQ
  bwd_preprocess_kernel  row stats {lse * log2 e, D = rowsum(dO * O)}, dq_accum = 0
                         (deterministic: each row's fixed-point scale)
  bwd_dkdv_kernel        dK, dV, dbias per key tile (or query chunk of it); dQ added into dq_accum
                         (Hopper, tile head dims 64 and 128: warpgroup products, built for sm_90a)
  bwd_convert_dq_kernel  dq = scale * dq_accum in the input dtype
dbias is written directly in the bias dtype when each element has one writer (the kernel writes
the skipped tiles' zeros too, so dbias is not memset first); when several CTAs
share an element (bias broadcast over batch, or one bias head for several kv heads) the kernel adds
into an fp32 buffer of the bias's shape, converted at the end. Scratch, all zeroed in one buffer
when needed: the chunk counters (key tiles cut into query chunks), and in deterministic mode the
K/V bound and the turn bits of shared dbias tiles; the chunks' fp32 dK, dV partials are not zeroed
(every slot is written).
"""

from __future__ import annotations

import math

import numpy

from .._block_map import map_strides, map_words
from . import compile as nvrtc
from . import device
from .bwd_config import THREADS, bwd_config
from .config import use_wgmma
from .fill import fill_attn
from .operands import aux_operand, element_strides, qkv_operand
from .params import BWD_PARAMS, new_record


def backward(dout, q, k, v, out, lse, mask, bias, problem, deterministic, block_map=None, *,
             tiles_visited=None):
    """See dmattn_cupy.backward (block_map: validated there). `tiles_visited` (uint64 cupy array of 1) counts the
    (query tile x head) steps the dK/dV kernel computed, summed over key tiles."""
    import cupy

    capability, sm_count = device.current()
    q, k, v = qkv_operand(q), qkv_operand(k), qkv_operand(v)
    if dout.dtype != q.dtype:
        dout = dout.astype(q.dtype)
    if out.dtype != q.dtype:
        out = out.astype(q.dtype)
    dout, out = qkv_operand(dout), qkv_operand(out)
    lse = cupy.ascontiguousarray(lse, dtype=numpy.float32)
    B, Sq, Sk, H, Hk = problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads, problem.kv_heads
    D = problem.head_dim
    group = H // Hk
    m = aux_operand(mask, heads=H, kv_heads=Hk, seqlen_k=Sk, is_mask=True)
    b = aux_operand(bias, heads=H, kv_heads=Hk, seqlen_k=Sk, is_mask=False)

    dbias = dbias_accum = None
    rows_reduced = db_atomic = False
    db_sharers = 1
    if bias is not None:
        bb, nh, bq, _ = (int(n) for n in bias.shape)
        rows_reduced = bq == 1
        db_atomic = (bb == 1 and B > 1) or (nh == 1 and Hk > 1)
        db_sharers = (B if bb == 1 else 1) * (Hk if nh == 1 else 1)
        # Shared cells take fp32 adds: start from zero. One writer per element: the kernel writes
        # every element, zeros included (the tiles it skips), so no memset runs before it.
        if db_atomic:
            dbias_accum = cupy.zeros(bias.shape, dtype=numpy.float32)
        else:
            dbias = cupy.empty(bias.shape, dtype=bias.dtype)
        db_head_div = 1 if nh == H else (group if nh == Hk else H)

    cfg = bwd_config(head_dim=D, batch=B, heads=H, kv_heads=Hk, seqlen_q=Sq, seqlen_k=Sk,
                     mask_bytes=m.elem_bytes, bias_bytes=b.elem_bytes,
                     bias_rows_reduced=rows_reduced, dbias_atomic=db_atomic,
                     dbias_sharers=db_sharers, causal=problem.causal, sm_count=sm_count,
                     wgmma=use_wgmma(capability, D, device.mma_choice()))
    tiles = cfg.tiles
    row_stats = cupy.empty((B, H, Sq, 2), dtype=numpy.float32)  # {lse2, D}: bwd_preprocess_kernel
    dq_accum = cupy.empty((B, H, Sq, D), dtype=numpy.float32)  # zeroed by bwd_preprocess_kernel
    dq = cupy.empty((B, Sq, H, D), dtype=q.dtype)
    dk = cupy.empty((B, Sk, Hk, D), dtype=q.dtype)
    dv = cupy.empty((B, Sk, Hk, D), dtype=q.dtype)
    # scratch (zeroed): chunk counters per (head-dim part, b, kv head, key tile), then in
    # deterministic mode the K/V bound (2 words) and the shared dbias tiles' turn bits
    counters = B * Hk * cfg.n_tiles * tiles.d_split if cfg.chunks > 1 else 0
    det_words = 2 + cfg.db_turn_words if deterministic else 0
    scratch = cupy.zeros(counters + det_words, dtype=numpy.uint32) if counters + det_words else None
    dq_scale = cupy.empty((B, H, Sq), dtype=numpy.float32) if deterministic else None
    dkv_partial = None
    if cfg.chunks > 1:  # fp32 dK, dV per (part, b, kv head, key tile, chunk): 2 x block_n x D/d_split
        dkv_partial = cupy.empty(B * Hk * cfg.n_tiles * cfg.chunks * 2 * tiles.block_n * tiles.head_dim,
                                 dtype=numpy.float32)

    rec = new_record(BWD_PARAMS)
    fill_attn(rec, problem, q, k, v, m, b, 1)
    if block_map is not None:  # the key tiles' query tiles from the map's bits, not the mask's bytes
        a, words = rec["a"], map_words(Sk)
        a["block_map"], a["map_words"] = block_map.bits.data.ptr, words
        a["map_stride"] = map_strides(tuple(mask.shape[:3]), words)
    rec["out"], rec["dout"] = out.data.ptr, dout.data.ptr
    rec["o_stride"] = element_strides(out)[:3]
    rec["do_stride"] = element_strides(dout)[:3]
    rec["lse"], rec["row_stats"], rec["dq_accum"] = lse.data.ptr, row_stats.data.ptr, dq_accum.data.ptr
    rec["dq"], rec["dk"], rec["dv"] = dq.data.ptr, dk.data.ptr, dv.data.ptr
    if bias is not None:
        target = dbias_accum if db_atomic else dbias
        if dbias is not None:
            rec["dbias"] = dbias.data.ptr
        if dbias_accum is not None:
            rec["dbias_accum"] = dbias_accum.data.ptr
        rec["dbias_stride"] = element_strides(target)
        rec["dbias_rows_reduced"] = int(rows_reduced)
        rec["dbias_head_div"] = db_head_div
    else:
        rec["dbias_head_div"] = 1
    rec["deterministic"] = int(deterministic)
    rec["chunk_tiles"] = cfg.chunk_tiles
    if counters:
        rec["dkv_count"] = scratch.data.ptr
        rec["dkv_partial"] = dkv_partial.data.ptr
    if deterministic:
        rec["kv_bound"] = scratch.data.ptr + 4 * counters
        rec["turns"] = scratch.data.ptr + 4 * (counters + 2)
        rec["dq_scale"] = dq_scale.data.ptr
    if tiles_visited is not None:
        rec["tiles_visited"] = tiles_visited.data.ptr

    elem = nvrtc.element_type(q.dtype)
    rows = B * H * Sq
    if deterministic:
        bound = nvrtc.get_kernel("bwd.cu", nvrtc.kernel_name("bwd_kv_bound_kernel", elem))
        nvrtc.launch(bound, (min(math.ceil(B * Sk * Hk / 4), 8 * sm_count),), THREADS, rec)
    pre = nvrtc.get_kernel("bwd.cu", nvrtc.kernel_name("bwd_preprocess_kernel", elem))
    nvrtc.launch(pre, (math.ceil(rows / 4),), THREADS, rec)
    kernel = nvrtc.get_kernel("bwd.cu", nvrtc.kernel_name(
        "bwd_dkdv_kernel", elem, tiles.head_dim, tiles.wgmma, m.elem_bytes, b.elem_bytes, problem.causal,
        problem.softcap > 0), "sm_90a" if tiles.wgmma else None)
    nvrtc.launch(kernel, (B * Hk, *cfg.grid), tiles.threads, rec, cfg.smem_bytes)
    convert = nvrtc.get_kernel("bwd.cu", nvrtc.kernel_name("bwd_convert_dq_kernel", elem))
    nvrtc.launch(convert, (math.ceil(rows / 4),), THREADS, rec)
    if dbias_accum is not None:
        dbias = dbias_accum.astype(bias.dtype)
    return dq, dk, dv, dbias
