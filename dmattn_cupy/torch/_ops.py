"""torch.library custom ops ``dmattn_cupy::fwd`` and ``dmattn_cupy::bwd`` with autograd.

One op pair serves both devices: CUDA tensors run dmattn_cupy's CuPy kernels (zero-copy, on
torch's current stream, memory from torch's allocator: see ``_bridge``); CPU tensors run the
NumPy reference. Both ops have fake (meta) implementations, so ``torch.compile(...,
fullgraph=True)`` traces through them without graph breaks, and ``register_autograd`` ties
them together:

    fwd(q, k, v, mask, bias, scale, causal, softcap, deterministic, block_map=None) -> (out, lse)
    bwd(dout, q, k, v, out, lse, mask, bias, scale, causal, softcap, deterministic,
        block_map=None) -> (dq, dk, dv, dbias)          dbias is an empty (0,) tensor when bias is None

Outputs are always fresh contiguous tensors (never views of inputs): out (B, Sq, H, D) in q's
dtype, lse (B, H, Sq) float32 (float64 for float64 input), dq/dk/dv in the shape and dtype of
q/k/v, dbias in the bias's own shape and dtype. lse is not differentiable; the mask gets no
gradient. block_map is the mask's block map (``mask_block_map``), made once and passed with the
mask: the CUDA forward then skips tiles without reading the mask first, and the backward finds
each key tile's query tiles from the map's bits rather than from the mask's column.

This module deliberately avoids ``from __future__ import annotations``: custom_op reads the
schema (``Optional[Tensor]`` for mask and bias) from real annotations.
"""

from typing import Optional

import numpy
import torch

import dmattn_cupy
from dmattn_cupy._block_map import BlockMap, map_shape
from dmattn_cupy._validate import validate_attention

from ._bridge import cupy_on_torch, from_numpy, reference_dtype, to_numpy

Tensor = torch.Tensor

# Mask dtypes the CUDA kernels read as they are; any other mask is converted to bool (!= 0).
_CUDA_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.float16, torch.bfloat16,
                     torch.float32, torch.float64)


def lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Input checks (shared by the real and the fake forward, so errors match under torch.compile)


def _stand_in(tensor: Optional[Tensor]):
    """A one-element NumPy array viewed at the tensor's shape (zero strides) and a NumPy dtype of
    the same kind, so dmattn_cupy's own validation can judge shapes and dtype kinds."""
    if tensor is None:
        return None
    if tensor.dtype.is_floating_point:
        dtype = numpy.float64 if tensor.dtype == torch.float64 else numpy.float32
    elif tensor.dtype.is_complex:
        dtype = numpy.complex64
    elif tensor.dtype == torch.bool:
        dtype = numpy.bool_
    else:
        dtype = numpy.int64
    return numpy.lib.stride_tricks.as_strided(numpy.zeros(1, dtype), tuple(tensor.shape),
                                              (0,) * tensor.dim(), writeable=False)


def check_inputs(q, k, v, mask, bias, scale, causal, softcap, block_map=None) -> None:
    """Raise TypeError/ValueError (dmattn_cupy's messages) for inputs the API would refuse."""
    named = {"query": q, "key": k, "value": v, "attn_mask": mask, "attn_bias": bias,
             "block_map": block_map}
    tensors = {name: t for name, t in named.items() if t is not None}
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"all tensors must be on one device; got {where}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"query, key, value must share one dtype; got query {q.dtype}, "
                        f"key {k.dtype}, value {v.dtype}")
    validate_attention(*(_stand_in(t) for t in (q, k, v, mask, bias)), scale, causal, softcap)
    if block_map is not None:
        _check_block_map(block_map, mask)


def _check_block_map(block_map: Tensor, mask: Optional[Tensor]) -> None:
    """The tensor from mask_block_map(mask): int32 words (the map's uint32 bits), shape
    mask.shape[:3] + (2, words), contiguous."""
    if mask is None:
        raise ValueError("block_map describes a mask: pass the mask it was made from as attn_mask; "
                         "got attn_mask=None")
    expected = map_shape(mask.shape)
    if block_map.dtype != torch.int32 or tuple(block_map.shape) != expected or not block_map.is_contiguous():
        raise ValueError(f"block_map must be a contiguous int32 tensor of shape {expected} "
                         f"(dmattn_cupy.torch.block_map(attn_mask)); got {block_map.dtype} "
                         f"{tuple(block_map.shape)}{'' if block_map.is_contiguous() else ', not contiguous'}")


def _as_block_map(block_map: Optional[Tensor], mask: Optional[Tensor], to_array):
    """dmattn_cupy.BlockMap over the tensor's memory (to_array: the tensor as a NumPy/CuPy array)."""
    if block_map is None:
        return None
    return BlockMap(to_array(block_map).view(numpy.uint32), tuple(mask.shape))


# ---------------------------------------------------------------------------------------------
# Real implementations


def _cpu_forward(q, k, v, mask, bias, scale, causal, softcap, block_map):
    dtype = reference_dtype(q.dtype)
    out, lse = dmattn_cupy.forward(
        to_numpy(q, dtype), to_numpy(k, dtype), to_numpy(v, dtype), to_numpy(mask),
        to_numpy(bias, dtype), scale=scale, causal=causal, softcap=softcap, return_lse=True,
        block_map=_as_block_map(block_map, mask, to_numpy))
    return from_numpy(out, q.dtype), from_numpy(lse, lse_dtype(q))


def _cpu_backward(dout, q, k, v, out, lse, mask, bias, scale, causal, softcap, deterministic,
                  block_map):
    dtype = reference_dtype(q.dtype)
    dq, dk, dv, dbias = dmattn_cupy.backward(
        to_numpy(dout, dtype), to_numpy(q, dtype), to_numpy(k, dtype), to_numpy(v, dtype),
        to_numpy(out, dtype), to_numpy(lse, lse_dtype(q)), to_numpy(mask),
        to_numpy(bias, dtype), scale=scale, causal=causal, softcap=softcap,
        deterministic=deterministic, block_map=_as_block_map(block_map, mask, to_numpy))
    return (from_numpy(dq, q.dtype), from_numpy(dk, k.dtype), from_numpy(dv, v.dtype),
            None if dbias is None else from_numpy(dbias, bias.dtype))


def _unit_last_stride(t: Tensor) -> Tensor:
    """The kernels read rows of D contiguous elements; other strides are free."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _cuda_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """The mask itself when the kernels read its dtype, else mask != 0 (a bool copy)."""
    return mask if mask is None or mask.dtype in _CUDA_MASK_DTYPES else mask != 0


def _cuda_operands(q, k, v, mask, bias):
    """q/k/v with a unit last stride; a mask dtype the kernels read; bias in q's dtype or
    float32. Each is the caller's tensor unless a conversion is needed (then a copy)."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    mask = _cuda_mask(mask)
    if bias is not None and bias.dtype not in (q.dtype, torch.float32):
        bias = bias.to(torch.float32)
    return q, k, v, mask, bias


def _cuda_forward(q, k, v, mask, bias, scale, causal, softcap, block_map):
    q, k, v, mask, bias = _cuda_operands(q, k, v, mask, bias)
    with cupy_on_torch(q.device) as ctx:
        out, lse = dmattn_cupy.forward(
            *(ctx.to_cupy(t) for t in (q, k, v, mask, bias)), scale=scale, causal=causal,
            softcap=softcap, return_lse=True, block_map=_as_block_map(block_map, mask, ctx.to_cupy))
        return ctx.to_torch(out).contiguous(), ctx.to_torch(lse).contiguous()


def _cuda_backward(dout, q, k, v, out, lse, mask, bias, scale, causal, softcap, deterministic,
                   block_map):
    bias_dtype = None if bias is None else bias.dtype
    q, k, v, mask, bias = _cuda_operands(q, k, v, mask, bias)
    dout, out = _unit_last_stride(dout.to(q.dtype)), _unit_last_stride(out)
    with cupy_on_torch(q.device) as ctx:
        grads = dmattn_cupy.backward(
            *(ctx.to_cupy(t) for t in (dout, q, k, v, out, lse, mask, bias)), scale=scale,
            causal=causal, softcap=softcap, deterministic=deterministic,
            block_map=_as_block_map(block_map, mask, ctx.to_cupy))
        dq, dk, dv, dbias = (None if g is None else ctx.to_torch(g).contiguous() for g in grads)
    if dbias is not None:
        dbias = dbias.to(bias_dtype)
    return dq, dk, dv, dbias


def mask_block_map(mask: Tensor) -> Tensor:
    """dmattn_cupy.block_map of a mask tensor, as an int32 tensor of its uint32 words on the mask's
    device (shape mask.shape[:3] + (2, words); torch has few uint32 ops)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor; got {type(mask).__qualname__}")
    if not mask.is_cuda:
        return torch.from_numpy(dmattn_cupy.block_map(to_numpy(mask)).bits.view(numpy.int32))
    import cupy

    mask = _cuda_mask(mask)
    with cupy_on_torch(mask.device) as ctx:
        return ctx.to_torch(dmattn_cupy.block_map(ctx.to_cupy(mask)).bits.view(cupy.int32))


# ---------------------------------------------------------------------------------------------
# The ops


@torch.library.custom_op("dmattn_cupy::fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                  bias: Optional[Tensor], scale: float, causal: bool, softcap: float,
                  deterministic: bool, block_map: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    check_inputs(q, k, v, mask, bias, scale, causal, softcap, block_map)
    run = _cuda_forward if q.is_cuda else _cpu_forward
    return run(q, k, v, mask, bias, scale, causal, softcap, block_map)


def _has_symbolic_shape(*tensors) -> bool:
    return any(not isinstance(n, int) for t in tensors if t is not None for n in t.shape)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, mask, bias, scale, causal, softcap, deterministic, block_map=None):
    # Under dynamic shapes the NumPy stand-ins would specialize every size (one graph per
    # shape); the real implementation checks the concrete shapes at run time instead.
    if not _has_symbolic_shape(q, k, v, mask, bias, block_map):
        check_inputs(q, k, v, mask, bias, scale, causal, softcap, block_map)
    batch, seqlen_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seqlen_q), dtype=lse_dtype(q))


@torch.library.custom_op("dmattn_cupy::bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  mask: Optional[Tensor], bias: Optional[Tensor], scale: float, causal: bool,
                  softcap: float, deterministic: bool, block_map: Optional[Tensor] = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    run = _cuda_backward if q.is_cuda else _cpu_backward
    dq, dk, dv, dbias = run(dout, q, k, v, out, lse, mask, bias, scale, causal, softcap,
                            deterministic, block_map)
    return dq, dk, dv, q.new_empty(0) if dbias is None else dbias


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, mask, bias, scale, causal, softcap,
                        deterministic, block_map=None):
    dbias = q.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, scale, causal, softcap, deterministic, block_map = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, bias, out, lse, block_map)
    ctx.options = (scale, causal, softcap, deterministic)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, mask, bias, out, lse, block_map = ctx.saved_tensors
    dq, dk, dv, dbias = attention_bwd(dout, q, k, v, out, lse, mask, bias, *ctx.options, block_map)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None,
            dbias if bias is not None and need[4] else None, None, None, None, None, None)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
