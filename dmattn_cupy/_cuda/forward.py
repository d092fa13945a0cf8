"""Forward launcher: out (and lse) from q, k, v, mask, bias on CuPy's current stream.

Everything that depends only on shapes, strides, dtypes and options (tile config, kernels, the
params record but for its pointers) is a cached plan, so a call costs a dictionary lookup, a
few pointer stores and the launches: decode-sized calls are not bound by Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from . import compile as nvrtc
from . import device
from .config import (DECODE_THREADS, WIDE_BLOCK_N, combine_blocks, combine_threads, decode_config, fwd_config,
                     use_decode, use_wgmma)
from .fill import fill_attn
from .operands import aux_operand, qkv_operand
from .params import FWD_PARAMS, TENSOR_MAP_WORDS, new_record, pointer_slots
from .tma import kv_tensor_map

_INPUTS = list(pointer_slots(FWD_PARAMS, "a.q", "a.k", "a.v", "a.mask", "a.bias"))
_OUT, _LSE, _O_SPLIT, _LSE_SPLIT, _TILES_VISITED, _ARRIVALS = pointer_slots(
    FWD_PARAMS, "out", "lse", "o_split", "lse_split", "tiles_visited", "arrivals")
_K_MAP, _V_MAP = (FWD_PARAMS.fields[name][1] // 8 for name in ("k_map", "v_map"))


@dataclass(frozen=True)
class FwdPlan:
    words: numpy.ndarray    # the FwdParams record as uint64 words, every field but the pointers
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
    arrivals: int           # decode kernel: arrival counters it needs (one per batch x kv head)
    problem: object         # the validated Problem whose identity keys this plan (kept alive)
    tma_keys: int = 0       # the wide Hopper kernel: keys per K/V box of its TMA maps (per call)


_PLANS: dict = {}
_PLANS_MAX = 1024
_WORKSPACES: dict = {}  # (device, stream) -> _DecodeWorkspace


@dataclass
class _DecodeWorkspace:
    """The decode kernel's scratch, reused by the calls on one stream (they run in order, so no
    two use it at once): split partials, and arrival counters that every call leaves at zero (so
    they are zeroed only when allocated)."""
    partials: object = None
    counters: object = None


def release_workspaces() -> None:
    """Drops the per-stream decode scratch (the next call allocates it again): for memory
    accounting."""
    _WORKSPACES.clear()


def _decode_workspace(partial_elems: int, counters: int) -> _DecodeWorkspace:
    import cupy

    key = (cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = _DecodeWorkspace()
    if ws.partials is None or ws.partials.size < partial_elems:
        ws.partials = cupy.empty(partial_elems, dtype=numpy.float32)
    if ws.counters is None or ws.counters.size < counters:
        ws.counters = cupy.zeros(max(counters, 64), dtype=numpy.uint32)
    return ws


def _operands(q, k, v, mask, bias, problem):
    """q, k, v, mask, bias as the kernels read them (copies only where they cannot be read)."""
    H, Hk, Sk = problem.heads, problem.kv_heads, problem.seqlen_k
    return (qkv_operand(q), qkv_operand(k), qkv_operand(v),
            aux_operand(mask, heads=H, kv_heads=Hk, seqlen_k=Sk, is_mask=True),
            aux_operand(bias, heads=H, kv_heads=Hk, seqlen_k=Sk, is_mask=False))


def _plan(q, k, v, mask, bias, problem, capability: int, sm_count: int, choice: str, tma: bool) -> FwdPlan:
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
    tma_kv = wgmma and tma and all(kv_tensor_map(x, WIDE_BLOCK_N) is not None for x in (k2, v2))
    cfg = fwd_config(
        head_dim=D, batch=B, heads=H, group=H // Hk, seqlen_q=Sq, seqlen_k=Sk,
        mask_bytes=m.elem_bytes, bias_bytes=b.elem_bytes,
        shares_aux=not (m.per_query_head or b.per_query_head), sm_count=sm_count, wgmma=wgmma,
        tma_kv=tma_kv,
    )
    fill_attn(rec, problem, q2, k2, v2, m, b, cfg.pack)
    rec["num_splits"], rec["tiles_per_split"] = cfg.num_splits, cfg.tiles_per_split
    rec["stages"] = cfg.stages
    if cfg.tiles.wgmma:
        kernel = nvrtc.get_kernel("fwd_wgmma.cu", nvrtc.kernel_name(
            "fwd_wgmma_kernel", elem, cfg.tiles.head_dim, cfg.tiles.warpgroups, *flags), "sm_90a")
    else:
        kernel = nvrtc.get_kernel("fwd.cu", nvrtc.kernel_name("fwd_kernel", elem, cfg.tiles.head_dim, *flags))
    combine = (nvrtc.get_kernel("fwd.cu", nvrtc.kernel_name("fwd_combine_kernel", elem))
               if cfg.num_splits > 1 else None)
    return FwdPlan(rec.view(numpy.uint64), kernel, (cfg.m_blocks, B * H // cfg.pack, cfg.num_splits),
                   cfg.tiles.threads, cfg.smem_bytes, combine, (combine_blocks(cfg.num_splits, B * H * Sq),),
                   combine_threads(cfg.num_splits, D), prepare, cfg.num_splits,
                   cfg.num_splits * B * H * Sq * (D + 1) if cfg.num_splits > 1 else 0, 0, problem,
                   WIDE_BLOCK_N if cfg.tiles.warpgroups == 2 else 0)


def forward(q, k, v, mask, bias, problem, return_lse, *, tiles_visited=None):
    """See dmattn_cupy.forward. `tiles_visited` (uint64 cupy array of 1) counts the
    (query tile x key tile) pairs computed, for tests of block skipping.

    A call whose shapes, strides, dtypes and options were seen before costs one dictionary
    lookup, the output allocations, a few pointer stores and the launches (the decode kernel's
    split partials live in scratch reused by the calls on the stream).
    """
    import cupy

    capability, sm_count = device.current()
    choice, tma = device.mma_choice(), device.tma_enabled()
    ptrs = tuple(0 if x is None else x.data.ptr for x in (q, k, v, mask, bias))
    # validate_attention hands out one Problem per signature (array types, shapes, dtypes,
    # strides and options), so its identity stands for all of them; the plan keeps it alive.
    key = (id(problem), tuple(ptr % 16 == 0 for ptr in ptrs), sm_count, choice, tma)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(q, k, v, mask, bias, problem, capability, sm_count, choice, tma)
    if plan.prepare:
        q, k, v, m, _ = _operands(q, k, v, mask, None, problem)
        ptrs = (q.data.ptr, k.data.ptr, v.data.ptr, m.ptr, ptrs[4])

    B, Sq, H, D = problem.batch, problem.seqlen_q, problem.heads, problem.head_dim
    out = cupy.empty((B, Sq, H, D), dtype=q.dtype)
    lse = cupy.empty((B, H, Sq), dtype=numpy.float32) if return_lse else None
    words = plan.words.copy()
    words[_INPUTS] = ptrs
    words[_OUT] = out.data.ptr
    words[_LSE] = 0 if lse is None else lse.data.ptr
    words[_TILES_VISITED] = 0 if tiles_visited is None else tiles_visited.data.ptr
    if plan.tma_keys:  # the plan's key fixes strides and alignment: these arrays encode as its did
        k_map, v_map = (kv_tensor_map(x, plan.tma_keys) for x in (k, v))
        words[_K_MAP:_K_MAP + TENSOR_MAP_WORDS] = k_map
        words[_V_MAP:_V_MAP + TENSOR_MAP_WORDS] = v_map
    if plan.arrivals:  # the decode kernel: small scratch, kept per stream (a decode step is short)
        ws = _decode_workspace(plan.partial_elems, plan.arrivals)
        partials = ws.partials
        words[_ARRIVALS] = ws.counters.data.ptr
    elif plan.partial_elems:
        partials = cupy.empty(plan.partial_elems, dtype=numpy.float32)
    if plan.partial_elems:
        words[_O_SPLIT] = partials.data.ptr
        words[_LSE_SPLIT] = partials.data.ptr + 4 * plan.num_splits * B * H * Sq * D
    nvrtc.launch(plan.kernel, plan.grid, plan.threads, words, plan.smem_bytes)
    if plan.combine is not None:
        nvrtc.launch(plan.combine, plan.combine_grid, plan.combine_threads, words)
    return (out, lse) if return_lse else out
