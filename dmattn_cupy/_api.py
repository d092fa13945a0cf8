"""Public functions: validate once, then dispatch on the array module.

NumPy arrays run the reference path (dmattn_cupy._reference); CuPy arrays run the CUDA
backend (dmattn_cupy._cuda), imported only when CuPy input arrives.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

from . import _reference, _topk
from ._arrays import is_cupy
from ._block_map import BlockMap, reference_block_map
from ._validate import (require_bool, validate_attention, validate_backward, validate_block_map,
                        validate_mask_array, validate_topk)


@functools.cache  # find_spec walks the import system: ~30 us, more than a decode step's kernels
def _cuda_backend() -> ModuleType:
    if importlib.util.find_spec("dmattn_cupy._cuda") is None:
        raise NotImplementedError(
            "CUDA kernels (dmattn_cupy._cuda) are not available in this installation; "
            "pass NumPy arrays to use the reference path")
    return importlib.import_module("dmattn_cupy._cuda")


def forward(q, k, v, mask=None, bias=None, *, scale=None, causal=False, softcap=0.0,
            return_lse=False, block_map=None):
    """Dynamic-mask attention forward.

    q (B, Sq, H, D); k, v (B, Sk, Hk, D) with H % Hk == 0 (query head h reads kv head
    h // (H // Hk)); mask, bias (B|1, H|Hk|1, Sq|1, Sk), mask nonzero = keep.

        s = scale * q k^T + bias;  s = softcap * tanh(s / softcap) if softcap > 0
        s = -inf where mask == 0 or (causal) key j > i + Sk - Sq
        out = softmax(s) v,  lse = log sum_j exp(s_ij)   (B, H, Sq)

    scale defaults to 1/sqrt(D). A row with no visible key gives out = 0 and lse = -inf.
    block_map: the mask's BlockMap (``block_map(mask)``, or from ``topk_mask``), made once and
    reused by every call with that mask: the CUDA path then skips tiles without reading the mask
    first (it reads the kept tiles' mask rows only). It must describe this mask (see BlockMap).
    Returns out (q's shape and dtype), or (out, lse) when return_lse is True.
    """
    problem = validate_attention(q, k, v, mask, bias, scale, causal, softcap)
    return_lse = require_bool("return_lse", return_lse)
    validate_block_map(block_map, mask, problem.xp)
    if is_cupy(problem.xp):
        return _cuda_backend().forward(q, k, v, mask, bias, problem, return_lse,
                                       block_map=block_map)
    out, lse = _reference.forward(q, k, v, mask, bias, problem)
    return (out, lse) if return_lse else out


def backward(dout, q, k, v, out, lse, mask=None, bias=None, *, scale=None, causal=False,
             softcap=0.0, deterministic=False, block_map=None):
    """Gradients of forward: (dq, dk, dv, dbias).

    Pass the same q, k, v, mask, bias and options as to forward, plus its out and lse.
    dk/dv sum over the query heads of their group; dbias has the bias's own shape (summed
    over its broadcast dims), or is None without bias. Gradients are exactly zero at
    positions hidden by mask or causal. deterministic=True makes the CUDA path's gradients
    bitwise identical run after run: dq is summed in 32-bit fixed point scaled per row (integer
    adds give the same bits in any order; at most a bf16 rounding step from the default's fp32
    sums), and a dbias shared by several kv heads or batches is added in a fixed order. The
    reference path is always deterministic. block_map: the mask's BlockMap, as for forward (the
    same map serves both): the CUDA path then finds each key tile's query tiles from the map's
    bits rather than from a pass over the mask's column (a 32nd of the bytes).
    """
    problem = validate_attention(q, k, v, mask, bias, scale, causal, softcap)
    validate_backward(dout, out, lse, problem)
    deterministic = require_bool("deterministic", deterministic)
    validate_block_map(block_map, mask, problem.xp)
    if is_cupy(problem.xp):
        return _cuda_backend().backward(dout, q, k, v, out, lse, mask, bias, problem,
                                        deterministic, block_map=block_map)
    return _reference.backward(dout, q, k, v, out, mask, bias, problem)


def topk_mask(bias, window, *, causal=False, block=None, mask=None, return_block_map=False):
    """Bool mask of bias's shape keeping the `window` largest visible bias entries per row.

    Entries hidden by `mask` (zero) or causal never count and are never kept; rows with fewer
    than `window` visible keys keep all of them; ties go to the earlier key. With `block`, a
    block of keys is kept whole when more than half of it was kept (the last partial block
    uses its own length). NumPy arrays run the reference (dmattn_cupy._topk); CuPy arrays run a
    per-row radix select kernel with the same result, bit for bit.
    return_block_map: returns (mask, its BlockMap) for forward's block_map; the CUDA kernel
    writes the map as it writes the mask, so it costs no pass over the mask.
    """
    xp = validate_topk(bias, window, causal, block, mask)
    with_map = require_bool("return_block_map", return_block_map)
    if is_cupy(xp):
        return _cuda_backend().topk_mask(bias, window, causal, block, mask, with_map)
    result = _topk.topk_mask(bias, window, causal, block, mask, xp)
    return (result, reference_block_map(result, xp)) if with_map else result


def block_map(mask) -> BlockMap:
    """The BlockMap of `mask` (B|1, H|Hk|1, Sq|1, Sk), bool or numeric, nonzero = keep: two bits
    per mask row and 128-key tile, set where the row keeps a key of the tile and where it keeps
    every key of it (``.tiles()``, ``.full_tiles()``).

    Make it once per mask and pass it to every forward call with that mask (block_map=...): the
    CUDA path then finds the tiles to skip from the map instead of reading the whole mask first
    (a pass that costs the mask's bytes at the GPU's read rate on every call). NumPy masks give a
    NumPy map (the reference), CuPy masks a CuPy one, from a kernel on the current stream.
    """
    xp = validate_mask_array(mask)
    if is_cupy(xp):
        return _cuda_backend().block_map(mask)
    return reference_block_map(mask, xp)
