"""PyTorch front end of dmattn_cupy, a drop-in for flash-dmattn's ``flash_dmattn_func``.

Switch by changing one import::

    # from flash_dmattn import flash_dmattn_func
    from dmattn_cupy.torch import flash_dmattn_func

    out = flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)

Layouts: query (B, Sq, H, D); key, value (B, Sk, Hk, D) with H % Hk == 0; attn_mask and
attn_bias (B|1, H|Hk|1, Sq|1, Sk). The math is dmattn_cupy.forward's (bias is added before
softcap; causal is aligned to the bottom-right corner; a row with no visible key gives 0).

Devices: CUDA tensors (float16/bfloat16) run the CuPy kernels with zero copies both ways, on
torch's current stream, with outputs and scratch from torch's caching allocator. CPU tensors
run the NumPy reference (float32/float64; float16/bfloat16 CPU tensors are computed in float32
and converted back), autograd included, so models and tests run without a GPU.

A mask used by several calls (every layer of a step) can bring its block map, made once:
``bm = block_map(mask)``, then ``flash_dmattn_func(..., attn_mask=mask, block_map=bm)``; the
CUDA forward then skips the mask's empty tiles without reading the mask first, and the backward
finds them from the map too (dmattn_cupy.BlockMap).

Everything goes through the custom ops ``torch.ops.dmattn_cupy.fwd`` / ``.bwd``, so
``torch.compile(model, fullgraph=True)`` traces through without graph breaks.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._ops import attention_bwd, attention_fwd, mask_block_map

__all__ = [
    "flash_dmattn_func",
    "block_map",
    "flash_dmattn_func_auto",
    "get_available_backends",
    "CUDA_AVAILABLE",
    "TRITON_AVAILABLE",
    "FLEX_AVAILABLE",
    "triton_dmattn_func",
    "flex_dmattn_func",
]


def _cuda_available() -> bool:
    from dmattn_cupy._arrays import cuda_device_available

    return torch.cuda.is_available() and cuda_device_available()


# flash-dmattn's module-level flags, for code that checks them (CUDA_AVAILABLE is computed on
# first access, see __getattr__, so importing this module does not import CuPy). dmattn_cupy has
# one function for both devices; it ships no Triton or Flex backend.
TRITON_AVAILABLE = False
FLEX_AVAILABLE = False
triton_dmattn_func = None
flex_dmattn_func = None


def _require_tensor(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}; got {type(value).__qualname__}")


def _option(name: str, value, default, kind):
    if value is None:
        return default
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None; got {type(value).__qualname__}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or None; got {type(value).__qualname__}")
    return float(value)


def flash_dmattn_func(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    deterministic: bool | None = None,
    return_attn_probs: bool | None = None,
    block_map: torch.Tensor | None = None,
):
    """Dynamic-mask attention with autograd; flash-dmattn's signature and layouts.

    Arguments:
        query: (B, Sq, H, D).
        key, value: (B, Sk, Hk, D); GQA/MQA when Hk < H (query head h reads kv head
            h // (H // Hk)).
        attn_mask: (B|1, H|Hk|1, Sq|1, Sk), bool or numeric, nonzero = keep. No gradient.
        attn_bias: (B|1, H|Hk|1, Sq|1, Sk) float, added to the scaled scores. Its gradient
            comes back in its own shape. With float16/bfloat16 query it may also be float32.
        softmax_scale: scale of q k^T; None means 1/sqrt(D).
        is_causal: causal mask aligned to the bottom-right corner (key j is visible to query i
            when j <= i + Sk - Sq). None means False.
        softcap: > 0 applies s = softcap * tanh(s / softcap) after the bias. None means 0.
        deterministic: deterministic backward on CUDA (bitwise reproducible dq/dk/dv/dbias).
            None means False here (flash-dmattn's None means True); the CPU path is always
            deterministic.
        return_attn_probs: for testing, as in flash-dmattn: also return lse (B, H, Sq) and the
            attention probabilities (B, H, Sq, Sk), both computed without gradient (the probs
            in float32, or float64 for float64 input, by plain torch math: O(Sq*Sk) memory).
        block_map: dmattn_cupy's addition, after flash-dmattn's arguments: attn_mask's block
            map from ``block_map(attn_mask)``, made once for every call with that mask. It must
            describe this mask (as a stale BlockMask in FlexAttention, one that does not gives
            undefined results); shapes are checked.

    Any view works: non-contiguous query/key/value (e.g. a transposed (B, H, S, D) tensor)
    and expanded (zero-stride) masks/biases are read in place on CUDA. Bad input raises
    dmattn_cupy's TypeError/ValueError.

    Returns:
        out (B, Sq, H, D) in query's dtype, or (out, lse, probs) with return_attn_probs.
    """
    _require_tensor("query", query)
    _require_tensor("key", key)
    _require_tensor("value", value)
    _require_tensor("attn_mask", attn_mask, optional=True)
    _require_tensor("attn_bias", attn_bias, optional=True)
    _require_tensor("block_map", block_map, optional=True)
    scale = _option("softmax_scale", softmax_scale, None, float)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    causal = _option("is_causal", is_causal, False, bool)
    cap = _option("softcap", softcap, 0.0, float)
    det = _option("deterministic", deterministic, False, bool)
    probs = _option("return_attn_probs", return_attn_probs, False, bool)

    out, lse = attention_fwd(query, key, value, attn_mask, attn_bias, scale, causal, cap, det,
                             block_map)
    if not probs:
        return out
    return out, lse, _attention_probs(query, key, attn_mask, attn_bias, scale, causal, cap)


def block_map(mask: torch.Tensor) -> torch.Tensor:
    """The mask's block map for ``flash_dmattn_func(..., block_map=)``: dmattn_cupy.block_map
    (two bits per mask row and 128-key tile: a kept key, every key kept) as an int32 tensor of its
    uint32 words, shape mask.shape[:3] + (2, ceil(ceil(Sk / 128) / 32)), on the mask's device.
    One pass over the mask (gqa8k's bool mask, 540 MB: ~0.19 ms on an H100); each forward call
    given it skips the pass it would make over the mask's causal part, and its backward reads the
    map's bits of each key tile rather than the mask's column."""
    return mask_block_map(mask)


def _heads_like_query(t: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """A (.., Hk, ..) mask/bias spread over the H query heads (other head sizes broadcast)."""
    if t.shape[1] == kv_heads and kv_heads != heads:
        return t.repeat_interleave(heads // kv_heads, dim=1)
    return t


def _attention_probs(query, key, mask, bias, scale, causal, softcap) -> torch.Tensor:
    """P (B, H, Sq, Sk) by plain torch math (no gradient): rows with no visible key are 0."""
    with torch.no_grad():
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        heads, kv_heads = query.shape[2], key.shape[2]
        seqlen_q, seqlen_k = query.shape[1], key.shape[1]
        q = query.transpose(1, 2).to(dtype)  # (B, H, Sq, D)
        k = _heads_like_query(key.transpose(1, 2).to(dtype), heads, kv_heads)
        s = scale * (q @ k.transpose(-1, -2))  # s = scale * q k^T
        if bias is not None:
            s = s + _heads_like_query(bias.to(dtype), heads, kv_heads)  # s += bias
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)  # s = c * tanh(s / c)
        visible = torch.ones_like(s, dtype=torch.bool)
        if mask is not None:
            visible = visible & (_heads_like_query(mask, heads, kv_heads) != 0)
        if causal:
            i = torch.arange(seqlen_q, device=s.device)[:, None]
            j = torch.arange(seqlen_k, device=s.device)[None, :]
            visible = visible & (j <= i + seqlen_k - seqlen_q)
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        return p.masked_fill(~visible, 0.0)  # empty rows: softmax gave NaN, P = 0


def get_available_backends() -> list[str]:
    """["cuda", "cpu"] with CuPy and a CUDA device, else ["cpu"].

    Both names stand for the same device-dispatching ``flash_dmattn_func``: CUDA tensors run
    the CuPy kernels, CPU tensors the NumPy reference.
    """
    return ["cuda", "cpu"] if _cuda_available() else ["cpu"]


def flash_dmattn_func_auto(backend: str | None = None, **kwargs):
    """flash-dmattn's backend selector: returns the attention function (not its output).

    backend None picks the first of get_available_backends(); "cuda" needs CuPy and a CUDA
    device (RuntimeError otherwise); "cpu" is always there. "triton" and "flex" are
    flash-dmattn backends that dmattn_cupy does not ship: RuntimeError. Extra keyword
    arguments are accepted for compatibility and ignored, as in flash-dmattn.
    """
    available = get_available_backends()
    if backend is None:
        backend = available[0]
    if backend in ("triton", "flex"):
        raise RuntimeError(f"the {backend!r} backend is flash-dmattn's; dmattn_cupy provides "
                           f"{available} (use backend=None or 'cuda')")
    if backend not in ("cuda", "cpu"):
        raise ValueError(f"unknown backend {backend!r}; available backends: {available}")
    if backend not in available:
        raise RuntimeError(f"the {backend!r} backend needs CuPy and a CUDA device; "
                           f"available backends: {available}")
    return flash_dmattn_func


def __getattr__(name: str):
    if name == "CUDA_AVAILABLE":
        return _cuda_available()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The raw custom ops, for users who want (out, lse) and their own autograd wiring.
fwd_op = attention_fwd
bwd_op = attention_bwd
