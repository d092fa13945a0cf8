"""Fills the AttnParams part shared by forward and backward."""

from __future__ import annotations

import math

from .operands import AuxOperand, element_strides

_LOG2E = 1.0 / math.log(2.0)


def fill_attn(rec, problem, q, k, v, mask: AuxOperand, bias: AuxOperand, pack: int) -> None:
    a = rec["a"]
    a["q"], a["k"], a["v"] = q.data.ptr, k.data.ptr, v.data.ptr
    a["mask"], a["bias"] = mask.ptr, bias.ptr
    a["q_stride"] = _bsh(q)
    a["k_stride"] = _bsh(k)
    a["v_stride"] = _bsh(v)
    a["mask_stride"] = mask.strides
    a["bias_stride"] = bias.strides
    a["batch"], a["heads"], a["kv_heads"] = problem.batch, problem.heads, problem.kv_heads
    a["seqlen_q"], a["seqlen_k"], a["head_dim"] = problem.seqlen_q, problem.seqlen_k, problem.head_dim
    a["group"] = problem.heads // problem.kv_heads
    a["mask_head_div"], a["bias_head_div"] = mask.head_div, bias.head_div
    a["pack"] = pack
    a["mask_vec"], a["bias_vec"] = int(mask.vec), int(bias.vec)
    a["scale"] = problem.scale
    a["scale_log2"] = problem.scale * _LOG2E
    a["softcap"] = problem.softcap


def _bsh(x) -> tuple[int, int, int]:
    """(batch, row, head) element strides of a (B, S, H, D) array; size-1 dims give 0."""
    s = element_strides(x)
    return s[0], s[1], s[2]
