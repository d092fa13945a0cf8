"""Dense float64 attention on the GPU (full temporaries; small sizes only), the GPU tests' oracle.

Written independently of the kernels and of the NumPy reference path: plain broadcasting and
einsum, forward by definition, backward by the textbook softmax-Jacobian formulas.
"""

from __future__ import annotations

import math


def _heads_full(x, heads: int, axis: int):
    """Repeats a head axis of size Hk (or 1) to the H query heads: head h reads h // (H // Hk)."""
    import cupy

    n = x.shape[axis]
    return x if n in (1, heads) else cupy.repeat(x, heads // n, axis=axis)


def scores(q, k, mask, bias, scale, causal, softcap):
    """(s, visible, t): float64 scores after bias/softcap, the visibility mask, tanh (or None)."""
    import cupy

    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    qf = cupy.moveaxis(q.astype(cupy.float64), 2, 1)                       # (B, H, Sq, D)
    kf = _heads_full(cupy.moveaxis(k.astype(cupy.float64), 2, 1), H, 1)    # (B, H, Sk, D)
    s = scale * cupy.einsum("bhqd,bhkd->bhqk", qf, kf)
    if bias is not None:
        s = s + _heads_full(bias.astype(cupy.float64), H, 1)
    t = None
    if softcap > 0:
        t = cupy.tanh(s / softcap)
        s = softcap * t
    visible = cupy.ones((B, H, Sq, Sk), dtype=bool)
    if mask is not None:
        visible &= _heads_full(mask, H, 1) != 0
    if causal:
        i = cupy.arange(Sq)[:, None]
        j = cupy.arange(Sk)[None, :]
        visible &= j <= i + Sk - Sq
    return s, visible, t


def forward(q, k, v, mask=None, bias=None, *, scale=None, causal=False, softcap=0.0):
    """(out float64 (B, Sq, H, D), lse float64 (B, H, Sq))."""
    import cupy

    H, D = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s, visible, _ = scores(q, k, mask, bias, scale, causal, softcap)
    p, lse = _softmax(s, visible)
    vf = _heads_full(cupy.moveaxis(v.astype(cupy.float64), 2, 1), H, 1)
    out = cupy.einsum("bhqk,bhkd->bhqd", p, vf)
    return cupy.moveaxis(out, 1, 2), lse


def _softmax(s, visible):
    """Softmax over the visible keys and its lse; rows with no visible key: p = 0, lse = -inf."""
    import cupy

    s = cupy.where(visible, s, -cupy.inf)
    m = s.max(axis=-1, keepdims=True)
    m_safe = cupy.where(cupy.isfinite(m), m, 0.0)
    e = cupy.where(visible, cupy.exp(s - m_safe), 0.0)
    l = e.sum(axis=-1)
    seen = l > 0
    lse = cupy.where(seen, m_safe[..., 0] + cupy.log(cupy.where(seen, l, 1.0)), -cupy.inf)
    return e / cupy.where(seen, l, 1.0)[..., None], lse


def backward(dout, q, k, v, mask=None, bias=None, *, scale=None, causal=False, softcap=0.0):
    """(dq, dk, dv, dbias) in float64; dbias summed to bias's shape (None without bias)."""
    import cupy

    B, Sq, H, D = q.shape
    Hk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s, visible, t = scores(q, k, mask, bias, scale, causal, softcap)
    p, _ = _softmax(s, visible)
    qf = cupy.moveaxis(q.astype(cupy.float64), 2, 1)
    kf = _heads_full(cupy.moveaxis(k.astype(cupy.float64), 2, 1), H, 1)
    vf = _heads_full(cupy.moveaxis(v.astype(cupy.float64), 2, 1), H, 1)
    do = cupy.moveaxis(dout.astype(cupy.float64), 2, 1)
    dv_h = cupy.einsum("bhqk,bhqd->bhkd", p, do)                            # dV = P^T dO
    dp = cupy.einsum("bhqd,bhkd->bhqk", do, vf)                             # dP = dO V^T
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))                    # softmax Jacobian
    if t is not None:
        ds = ds * (1.0 - t * t)                                             # d softcap
    dq = scale * cupy.einsum("bhqk,bhkd->bhqd", ds, kf)
    dk_h = scale * cupy.einsum("bhqk,bhqd->bhkd", ds, qf)

    def to_kv(x):  # (B, H, Sk, D) summed over each group -> (B, Sk, Hk, D)
        return cupy.moveaxis(x.reshape(B, Hk, H // Hk, *x.shape[2:]).sum(axis=2), 1, 2)

    dbias = None
    if bias is not None:
        dbias = ds
        if bias.shape[1] != H:
            dbias = dbias.reshape(B, bias.shape[1], H // bias.shape[1], Sq, -1).sum(axis=2)
        for axis in (0, 2):
            if bias.shape[axis] == 1:
                dbias = dbias.sum(axis=axis, keepdims=True)
    return cupy.moveaxis(dq, 1, 2), to_kv(dk_h), to_kv(dv_h), dbias


# ---------------------------------------------------------------------------------------------
# Helpers shared by the GPU tests: fresh random inputs, poisoned outputs, relative error.


def poison_pool(nbytes: int = 1 << 28) -> None:
    """Fills free pool memory with NaN, so an output element a kernel fails to write is NaN."""
    import cupy
    import numpy

    x = cupy.full(nbytes // 4, numpy.nan, dtype=numpy.float32)
    del x


def rel_err(x, y) -> float:
    """||x - y|| / ||y|| in float64 (max |x| when y is all zero)."""
    import cupy

    x = x.astype(cupy.float64)
    y = y.astype(cupy.float64)
    denom = float(cupy.linalg.norm(y.ravel()))
    if denom == 0.0:
        return float(cupy.abs(x).max()) if x.size else 0.0
    return float(cupy.linalg.norm((x - y).ravel())) / denom


def randn(shape, dtype, scale=1.0):
    import cupy

    return (cupy.random.standard_normal(shape, dtype=cupy.float32) * scale).astype(dtype)


def make_inputs(B, Sq, Sk, H, Hk, D, dtype, mask_shape=None, bias_shape=None, density=0.7,
                mask_dtype=bool, bias_dtype=None):
    """q, k, v, mask (kept with probability `density`) and bias, freshly drawn."""
    import cupy

    q, k, v = randn((B, Sq, H, D), dtype), randn((B, Sk, Hk, D), dtype), randn((B, Sk, Hk, D), dtype)
    mask = bias = None
    if mask_shape is not None:
        mask = (cupy.random.random(mask_shape) < density).astype(mask_dtype)
    if bias_shape is not None:
        bias = randn(bias_shape, bias_dtype or dtype)
    return q, k, v, mask, bias
