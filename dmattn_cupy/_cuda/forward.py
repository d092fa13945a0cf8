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
from .config import FwdConfig, combine_threads, fwd_config, use_wgmma
from .fill import fill_attn
from .operands import aux_operand, qkv_operand
from .params import FWD_PARAMS, new_record, pointer_slots

_INPUTS = list(pointer_slots(FWD_PARAMS, "a.q", "a.k", "a.v", "a.mask", "a.bias"))
_OUT, _LSE, _O_SPLIT, _LSE_SPLIT, _TILES_VISITED = pointer_slots(
    FWD_PARAMS, "out", "lse", "o_split", "lse_split", "tiles_visited")


@dataclass(frozen=True)
class FwdPlan:
    config: FwdConfig
    words: numpy.ndarray    # the FwdParams record as uint64 words, every field but the pointers
    kernel: object
    combine: object         # None unless the keys are split
    grid: tuple[int, int, int]
    combine_grid: tuple[int]
    combine_threads: int
    prepare: bool           # an input must be copied or converted before the kernels read it
    partial_elems: int      # fp32 elements of the split partials: outputs, then their lse


_PLANS: dict = {}


def _operands(q, k, v, mask, bias, problem):
    """q, k, v, mask, bias as the kernels read them (copies only where they cannot be read)."""
    H, Hk, Sk = problem.heads, problem.kv_heads, problem.seqlen_k
    return (qkv_operand(q), qkv_operand(k), qkv_operand(v),
            aux_operand(mask, heads=H, kv_heads=Hk, seqlen_k=Sk, is_mask=True),
            aux_operand(bias, heads=H, kv_heads=Hk, seqlen_k=Sk, is_mask=False))


def _plan(key, q, k, v, mask, bias, problem, capability: int, sm_count: int, choice: str) -> FwdPlan:
    q2, k2, v2, m, b = _operands(q, k, v, mask, bias, problem)
    wgmma = use_wgmma(capability, problem.head_dim, choice)
    B, Sq, Sk, H, D = problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads, problem.head_dim
    cfg = fwd_config(
        head_dim=D, batch=B, heads=H, group=H // problem.kv_heads, seqlen_q=Sq, seqlen_k=Sk,
        mask_bytes=m.elem_bytes, bias_bytes=b.elem_bytes,
        shares_aux=not (m.per_query_head or b.per_query_head), sm_count=sm_count, wgmma=wgmma,
    )
    rec = new_record(FWD_PARAMS)
    fill_attn(rec, problem, q2, k2, v2, m, b, cfg.pack)
    rec["o_stride"] = (Sq * H * D, H * D, D)
    rec["num_splits"], rec["tiles_per_split"] = cfg.num_splits, cfg.tiles_per_split
    rec["stages"] = cfg.stages
    elem = nvrtc.element_type(q.dtype)
    if cfg.tiles.wgmma:
        kernel = nvrtc.get_kernel("fwd_wgmma.cu", nvrtc.kernel_name(
            "fwd_wgmma_kernel", elem, cfg.tiles.head_dim, cfg.tiles.warpgroups, m.elem_bytes,
            b.elem_bytes, problem.causal, problem.softcap > 0), "sm_90a")
    else:
        kernel = nvrtc.get_kernel("fwd.cu", nvrtc.kernel_name(
            "fwd_kernel", elem, cfg.tiles.head_dim, m.elem_bytes, b.elem_bytes, problem.causal,
            problem.softcap > 0))
    combine = (nvrtc.get_kernel("fwd.cu", nvrtc.kernel_name("fwd_combine_kernel", elem))
               if cfg.num_splits > 1 else None)
    prepare = any(x is not y for x, y in ((q, q2), (k, k2), (v, v2), (mask, m.array)))
    plan = FwdPlan(cfg, rec.view(numpy.uint64), kernel, combine,
                   (cfg.m_blocks, B * H // cfg.pack, cfg.num_splits), (B * H * Sq,),
                   combine_threads(cfg.num_splits, D), prepare,
                   cfg.num_splits * B * H * Sq * (D + 1) if cfg.num_splits > 1 else 0)
    _PLANS[key] = plan
    return plan


def forward(q, k, v, mask, bias, problem, return_lse, *, tiles_visited=None):
    """See dmattn_cupy.forward. `tiles_visited` (uint64 cupy array of 1) counts the
    (query tile x key tile) pairs computed, for tests of block skipping.

    A call whose shapes, strides, dtypes and options were seen before costs one dictionary
    lookup, the output allocations, a few pointer stores and the launches.
    """
    import cupy

    capability, sm_count = device.current()
    choice = device.mma_choice()
    ptrs = tuple(0 if x is None else x.data.ptr for x in (q, k, v, mask, bias))
    key = tuple(None if x is None else (x.shape, x.strides, x.dtype.str, ptr % 16 == 0)
                for x, ptr in zip((q, k, v, mask, bias), ptrs))
    key += (problem.scale, problem.causal, problem.softcap, sm_count, choice)
    plan = _PLANS.get(key) or _plan(key, q, k, v, mask, bias, problem, capability, sm_count, choice)
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
    if plan.partial_elems:
        partials = cupy.empty(plan.partial_elems, dtype=numpy.float32)
        words[_O_SPLIT] = partials.data.ptr
        words[_LSE_SPLIT] = partials.data.ptr + 4 * plan.config.num_splits * B * H * Sq * D
    nvrtc.launch(plan.kernel, plan.grid, plan.config.tiles.threads, words, plan.config.smem_bytes)
    if plan.combine is not None:
        nvrtc.launch(plan.combine, plan.combine_grid, plan.combine_threads, words)
    return (out, lse) if return_lse else out
