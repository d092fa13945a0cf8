"""Forward launcher: out (and lse) from q, k, v, mask, bias on CuPy's current stream.

Everything that depends only on shapes, strides, dtypes and options (tile config, kernels, the
params record but for its pointers) is a cached plan, so a call costs a dictionary lookup, a
few pointer stores and the launches: decode-sized calls are not bound by Python.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy

from .._block_map import map_strides, map_words
from . import compile as nvrtc
from . import device
from .block_map import MapPass, map_pass
from .config import (DECODE_THREADS, WIDE_BLOCK_N, combine_blocks, combine_threads, decode_config, fwd_config,
                     use_decode, use_wgmma)
from .fill import fill_attn
from .operands import aux_operand, qkv_operand
from .params import FWD_PARAMS, TENSOR_MAP_WORDS, new_record, pointer_slots
from .tma import bshd_tensor_map

_INPUTS = pointer_slots(FWD_PARAMS, "a.q", "a.k", "a.v", "a.mask", "a.bias")
assert _INPUTS == tuple(range(_INPUTS[0], _INPUTS[0] + 5))  # one slice store per call
_OUT, _LSE, _O_SPLIT, _LSE_SPLIT, _TILES_VISITED, _ARRIVALS, _BLOCK_MAP = pointer_slots(
    FWD_PARAMS, "out", "lse", "o_split", "lse_split", "tiles_visited", "arrivals", "a.block_map")
_Q_MAP, _K_MAP, _V_MAP = (FWD_PARAMS.fields[name][1] // 8 for name in ("q_map", "k_map", "v_map"))


@dataclass(frozen=True)
class FwdPlan:
    words: numpy.ndarray    # the FwdParams record as uint64 words: every field but the pointers,
                            # which each call stores (the same slots every call) before launching
    kernel: object
    grid: tuple[int, int, int]
    threads: int
    smem_bytes: int
    combine: object         # fwd_combine_kernel when the tile kernel's keys are split, else None
    combine_grid: tuple[int]
    combine_threads: int
    prepare: bool           # an input must be copied or converted before the kernels read it
    num_splits: int
    partial_elems: int      # fp32 elements of the split partials: outputs, then their lse
    arrivals: int           # counters it needs (decode: one per batch x kv head; fwd_ws: two)
    problem: object         # the validated Problem whose identity keys this plan (kept alive)
    tma_rows: tuple = ()    # fwd_ws: rows per box of the Q and of the K/V tensor maps (per call)
    reads_map: bool = False  # fwd_ws with a mask: the kernel reads a block map, the caller's or,
    map_pass: MapPass = None  # without one, the map this pass writes first into the scratch
    # `words` and the kernelParams pointer to it (nvrtc.ParamBuffer); one call fills them at a time
    buffer: nvrtc.ParamBuffer = field(init=False)
    lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self):
        object.__setattr__(self, "buffer", nvrtc.ParamBuffer(self.words))


_PLANS: dict = {}
_PLANS_MAX = 1024
_WORKSPACES: dict = {}  # (device, stream) -> _Workspace


@dataclass
class _Workspace:
    """Scratch reused by the calls on one stream (they run in order, so no two use it at once):
    the decode kernel's split partials, counters that every call leaves at zero (so they are
    zeroed only when allocated): the decode kernel's arrivals, fwd_ws_kernel's work counter, and
    the block map that fwd_ws_kernel reads when the caller gave none (written whole by each call)."""
    partials: object = None
    counters: object = None
    block_map: object = None


def release_workspaces() -> None:
    """Drops the per-stream scratch (the next call allocates it again): for memory accounting."""
    _WORKSPACES.clear()


def _workspace(partial_elems: int, counters: int, map_elems: int, stream: int) -> _Workspace:
    import cupy

    key = (cupy.cuda.runtime.getDevice(), stream)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = _Workspace()
    if partial_elems and (ws.partials is None or ws.partials.size < partial_elems):
        ws.partials = cupy.empty(partial_elems, dtype=numpy.float32)
    if ws.counters is None or ws.counters.size < counters:
        ws.counters = cupy.zeros(max(counters, 64), dtype=numpy.uint32)
    if map_elems and (ws.block_map is None or ws.block_map.size < map_elems):
        ws.block_map = cupy.empty(map_elems, dtype=numpy.uint32)
    return ws


def _operands(q, k, v, mask, bias, problem):
    """q, k, v, mask, bias as the kernels read them (copies only where they cannot be read)."""
    H, Hk, Sk = problem.heads, problem.kv_heads, problem.seqlen_k
    return (qkv_operand(q), qkv_operand(k), qkv_operand(v),
            aux_operand(mask, heads=H, kv_heads=Hk, seqlen_k=Sk, is_mask=True),
            aux_operand(bias, heads=H, kv_heads=Hk, seqlen_k=Sk, is_mask=False))


def _plan(q, k, v, mask, bias, problem, capability: int, sm_count: int, choice: str, tma: bool,
          given_map: bool) -> FwdPlan:
    q2, k2, v2, m, b = _operands(q, k, v, mask, bias, problem)
    B, Sq, Sk, H, D = problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads, problem.head_dim
    Hk = problem.kv_heads
    rec = new_record(FWD_PARAMS)
    rec["o_stride"] = (Sq * H * D, H * D, D)
    elem = nvrtc.element_type(q.dtype)
    flags = (m.elem_bytes, b.elem_bytes, problem.causal, problem.softcap > 0)
    prepare = any(x is not y for x, y in ((q, q2), (k, k2), (v, v2), (mask, m.array)))
    if use_decode(H // Hk, Sq, Sk, m.elem_bytes > 0):
        cfg = decode_config(head_dim=D, batch=B, kv_heads=Hk, rows=H // Hk * Sq, seqlen_k=Sk, sm_count=sm_count)
        fill_attn(rec, problem, q2, k2, v2, m, b, 1)
        rec["num_splits"], rec["keys_per_split"] = cfg.num_splits, cfg.keys_per_split
        kernel = nvrtc.get_kernel("fwd_decode.cu", nvrtc.kernel_name("fwd_decode_kernel", elem, cfg.head_dim, *flags))
        return FwdPlan(rec.view(numpy.uint64), kernel, (cfg.num_splits, B * Hk, 1), DECODE_THREADS,
                       cfg.smem_bytes, None, (), 0, prepare, cfg.num_splits,
                       cfg.num_splits * B * H * Sq * (D + 1), B * Hk, problem)
    wgmma = use_wgmma(capability, D, choice)
    cfg = fwd_config(
        head_dim=D, batch=B, heads=H, group=H // Hk, seqlen_q=Sq, seqlen_k=Sk,
        mask_bytes=m.elem_bytes, bias_bytes=b.elem_bytes,
        shares_aux=not (m.per_query_head or b.per_query_head), sm_count=sm_count, wgmma=wgmma,
        tma=wgmma and tma and all(bshd_tensor_map(x, WIDE_BLOCK_N) is not None for x in (q2, k2, v2)),
        aux_vec=all(x.vec for x in (m, b) if x.elem_bytes),
    )
    fill_attn(rec, problem, q2, k2, v2, m, b, cfg.pack)
    rec["num_splits"], rec["tiles_per_split"] = cfg.num_splits, cfg.tiles_per_split
    rec["stages"] = cfg.stages
    rec["m_blocks"], rec["row_groups"] = cfg.m_blocks, B * H // cfg.pack
    wide = cfg.tiles.warpgroups == 2
    if wide:
        kernel = nvrtc.get_kernel("fwd_ws.cu", nvrtc.kernel_name(
            "fwd_ws_kernel", elem, cfg.tiles.head_dim, *flags), "sm_90a")
    elif cfg.tiles.wgmma:
        kernel = nvrtc.get_kernel("fwd_wgmma.cu", nvrtc.kernel_name(
            "fwd_wgmma_kernel", elem, cfg.tiles.head_dim, *flags), "sm_90a")
    else:
        kernel = nvrtc.get_kernel("fwd.cu", nvrtc.kernel_name("fwd_kernel", elem, cfg.tiles.head_dim, *flags))
    combine = (nvrtc.get_kernel("fwd.cu", nvrtc.kernel_name("fwd_combine_kernel", elem))
               if cfg.num_splits > 1 else None)
    reads_map, prepass = wide and m.elem_bytes > 0, None
    if reads_map:
        # The caller's map has the mask's shape; the one made here has a row per distinct mask row
        # (one along a broadcast or expanded dim) and reads only the keys the call's rows see.
        rec["a"]["map_words"] = words = map_words(Sk)
        if given_map:
            dims = tuple(mask.shape[:3])
        else:
            dims = tuple(n if s else 1 for n, s in zip(m.array.shape[:3], m.strides[:3]))
            prepass = map_pass(m, dims, Sk, Sq if problem.causal else 0)
        rec["a"]["map_stride"] = map_strides(dims, words)
    items = cfg.m_blocks * B * H // cfg.pack * cfg.num_splits
    # fwd_ws is persistent: a CTA per multiprocessor (at most one per item) takes items from a counter
    grid = (min(items, sm_count), 1, 1) if wide else (cfg.m_blocks, B * H // cfg.pack, cfg.num_splits)
    return FwdPlan(rec.view(numpy.uint64), kernel, grid,
                   cfg.tiles.threads, cfg.smem_bytes, combine, (combine_blocks(cfg.num_splits, B * H * Sq),),
                   combine_threads(cfg.num_splits, D), prepare, cfg.num_splits,
                   cfg.num_splits * B * H * Sq * (D + 1) if cfg.num_splits > 1 else 0, 2 if wide else 0, problem,
                   (cfg.tiles.block_m // cfg.pack, WIDE_BLOCK_N) if wide else (), reads_map, prepass)


def forward(q, k, v, mask, bias, problem, return_lse, block_map=None, *, tiles_visited=None):
    """See dmattn_cupy.forward (block_map: validated there). `tiles_visited` (uint64 cupy array of 1) counts the
    (query tile x key tile) pairs computed, for tests of block skipping.

    A call whose shapes, strides, dtypes and options were seen before costs one dictionary
    lookup, the output allocations, the plan's record refilled with this call's pointers (and,
    for the wide Hopper kernel, its tensor maps: cached per array) and the launches (the decode
    kernel's split partials and the counters live in scratch reused by the calls on the stream).
    """
    import cupy

    capability, sm_count = device.current()
    choice, tma = device.mma_choice(), device.tma_enabled()
    ptrs = tuple(0 if x is None else x.data.ptr for x in (q, k, v, mask, bias))
    # validate_attention hands out one Problem per signature (array types, shapes, dtypes,
    # strides and options), so its identity stands for all of them; the plan keeps it alive.
    aligned = (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3] | ptrs[4]) % 16 == 0 or tuple(p % 16 == 0 for p in ptrs)
    key = (id(problem), aligned, sm_count, choice, tma, block_map is None)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(q, k, v, mask, bias, problem, capability, sm_count, choice, tma,
                                   block_map is not None)
    if plan.prepare:
        q, k, v, m, _ = _operands(q, k, v, mask, None, problem)
        ptrs = (q.data.ptr, k.data.ptr, v.data.ptr, m.ptr, ptrs[4])

    B, Sq, H, D = problem.batch, problem.seqlen_q, problem.heads, problem.head_dim
    out = cupy.empty((B, Sq, H, D), dtype=q.dtype)
    lse = cupy.empty((B, H, Sq), dtype=numpy.float32) if return_lse else None
    partials = None
    if plan.partial_elems and (plan.combine or not plan.arrivals):  # merged by the combine kernel
        partials = cupy.empty(plan.partial_elems, dtype=numpy.float32)
    stream = cupy.cuda.get_current_stream().ptr
    with plan.lock:  # the record is the plan's: one call fills and launches it at a time
        words, args = plan.words, plan.buffer.args
        words[_INPUTS[0]:_INPUTS[0] + 5] = ptrs
        words[_OUT] = out.data.ptr
        words[_LSE] = 0 if lse is None else lse.data.ptr
        words[_TILES_VISITED] = 0 if tiles_visited is None else tiles_visited.data.ptr
        if plan.tma_rows:  # the plan's key fixes strides and alignment: these arrays encode as its did
            q_rows, kv_rows = plan.tma_rows
            for slot, x, rows in ((_Q_MAP, q, q_rows), (_K_MAP, k, kv_rows), (_V_MAP, v, kv_rows)):
                words[slot:slot + TENSOR_MAP_WORDS] = bshd_tensor_map(x, rows)
        if plan.arrivals:  # counters, and the decode kernel's partials: small scratch kept per stream
            ws = _workspace(0 if plan.combine else plan.partial_elems, plan.arrivals,
                            plan.map_pass.map_elems if plan.map_pass else 0, stream)
            words[_ARRIVALS] = ws.counters.data.ptr
            if partials is None:
                partials = ws.partials
            if plan.reads_map:
                words[_BLOCK_MAP] = ws.block_map.data.ptr if plan.map_pass else block_map.bits.data.ptr
        if plan.partial_elems:
            words[_O_SPLIT] = partials.data.ptr
            words[_LSE_SPLIT] = partials.data.ptr + 4 * plan.num_splits * B * H * Sq * D
        if plan.map_pass:  # fwd_ws without the caller's block map: the mask's, first
            plan.map_pass.launch(ptrs[3], ws.block_map.data.ptr, stream)
        nvrtc.launch_args(plan.kernel, plan.grid, plan.threads, args, plan.smem_bytes, stream)
        if plan.combine is not None:
            nvrtc.launch_args(plan.combine, plan.combine_grid, plan.combine_threads, args, 0, stream)
    return (out, lse) if return_lse else out
