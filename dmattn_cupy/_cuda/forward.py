"""Forward launcher: out (and lse) from q, k, v, mask, bias on CuPy's current stream.

Everything that depends only on shapes, strides, dtypes and options (tile config, kernels, the
params record but for its pointers) is a cached plan, so a call costs a dictionary lookup, a
few pointer stores and the launches: decode-sized calls are not bound by Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy

from . import compile as nvrtc
from . import device
from .config import THREADS, FwdConfig, fwd_config, use_wgmma
from .fill import fill_attn
from .operands import AuxOperand, aux_operand, qkv_operand
from .params import FWD_PARAMS, new_record, pointer_slots

_POINTERS = pointer_slots(FWD_PARAMS, "a.q", "a.k", "a.v", "a.mask", "a.bias", "out", "lse",
                          "o_split", "lse_split", "tiles_visited")


@dataclass(frozen=True)
class FwdPlan:
    config: FwdConfig
    record: numpy.ndarray   # every field but the pointers
    kernel: object
    combine: object         # None unless the keys are split
    grid: tuple[int, int, int]
    combine_grid: tuple[int]


_PLANS: dict = {}


def _layout(x) -> tuple:
    return None if x is None else (x.shape, x.strides, x.dtype.str, x.data.ptr % 16 == 0)


def _plan(q, k, v, m: AuxOperand, b: AuxOperand, problem, capability: int, sm_count: int) -> FwdPlan:
    wgmma = use_wgmma(capability, problem.head_dim, device.mma_choice())
    key = (_layout(q), _layout(k), _layout(v), _layout(m.array), _layout(b.array), problem.scale,
           problem.causal, problem.softcap, sm_count, wgmma)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    B, Sq, Sk, H, D = problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads, problem.head_dim
    cfg = fwd_config(
        head_dim=D, batch=B, heads=H, group=H // problem.kv_heads, seqlen_q=Sq, seqlen_k=Sk,
        mask_bytes=m.elem_bytes, bias_bytes=b.elem_bytes,
        shares_aux=not (m.per_query_head or b.per_query_head), sm_count=sm_count, wgmma=wgmma,
    )
    rec = new_record(FWD_PARAMS)
    fill_attn(rec, problem, q, k, v, m, b, cfg.pack)
    rec["o_stride"] = (Sq * H * D, H * D, D)
    rec["num_splits"], rec["tiles_per_split"] = cfg.num_splits, cfg.tiles_per_split
    rec["stages"] = cfg.stages
    elem = nvrtc.element_type(q.dtype)
    if cfg.tiles.wgmma:
        kernel = nvrtc.get_kernel("fwd_wgmma.cu", nvrtc.kernel_name(
            "fwd_wgmma_kernel", elem, cfg.tiles.head_dim, m.elem_bytes, b.elem_bytes, problem.causal,
            problem.softcap > 0), "sm_90a")
    else:
        kernel = nvrtc.get_kernel("fwd.cu", nvrtc.kernel_name(
            "fwd_kernel", elem, cfg.tiles.head_dim, m.elem_bytes, b.elem_bytes, problem.causal,
            problem.softcap > 0))
    combine = (nvrtc.get_kernel("fwd.cu", nvrtc.kernel_name("fwd_combine_kernel", elem))
               if cfg.num_splits > 1 else None)
    plan = FwdPlan(cfg, rec, kernel, combine, (cfg.m_blocks, B * H // cfg.pack, cfg.num_splits),
                   (math.ceil(B * H * Sq / 4),))
    _PLANS[key] = plan
    return plan


def forward(q, k, v, mask, bias, problem, return_lse, *, tiles_visited=None):
    """See dmattn_cupy.forward. `tiles_visited` (uint64 cupy array of 1) counts the
    (query tile x key tile) pairs computed, for tests of block skipping."""
    import cupy

    capability, sm_count = device.current()
    q, k, v = qkv_operand(q), qkv_operand(k), qkv_operand(v)
    B, Sq, H, D = problem.batch, problem.seqlen_q, problem.heads, problem.head_dim
    m = aux_operand(mask, heads=H, kv_heads=problem.kv_heads, seqlen_k=problem.seqlen_k, is_mask=True)
    b = aux_operand(bias, heads=H, kv_heads=problem.kv_heads, seqlen_k=problem.seqlen_k, is_mask=False)
    plan = _plan(q, k, v, m, b, problem, capability, sm_count)

    out = cupy.empty((B, Sq, H, D), dtype=q.dtype)
    lse = cupy.empty((B, H, Sq), dtype=numpy.float32)
    splits = plan.config.num_splits
    o_split = lse_split = None
    if splits > 1:
        o_split = cupy.empty((splits, B * H, Sq, D), dtype=numpy.float32)
        lse_split = cupy.empty((splits, B * H, Sq), dtype=numpy.float32)
    rec = plan.record.copy()
    ptrs = rec.view(numpy.uint64)
    for slot, x in zip(_POINTERS, (q, k, v, m.array, b.array, out, lse, o_split, lse_split, tiles_visited)):
        ptrs[slot] = 0 if x is None else x.data.ptr
    nvrtc.launch(plan.kernel, plan.grid, THREADS, rec, plan.config.smem_bytes)
    if plan.combine is not None:
        nvrtc.launch(plan.combine, plan.combine_grid, THREADS, rec)
    return (out, lse) if return_lse else out
