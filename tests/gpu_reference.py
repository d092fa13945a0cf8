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
    s = cupy.where(visible, s, -cupy.inf)
    m = s.max(axis=-1, keepdims=True)
    m_safe = cupy.where(cupy.isfinite(m), m, 0.0)
    p = cupy.where(visible, cupy.exp(s - m_safe), 0.0)
    l = p.sum(axis=-1, keepdims=True)
    vf = _heads_full(cupy.moveaxis(v.astype(cupy.float64), 2, 1), H, 1)
    out = cupy.einsum("bhqk,bhkd->bhqd", p / cupy.where(l > 0, l, 1.0), vf)
    lse = cupy.where(l[..., 0] > 0, m_safe[..., 0] + cupy.log(cupy.where(l[..., 0] > 0, l[..., 0], 1.0)), -cupy.inf)
    return cupy.moveaxis(out, 1, 2), lse


def backward(dout, q, k, v, mask=None, bias=None, *, scale=None, causal=False, softcap=0.0):
    """(dq, dk, dv, dbias) in float64; dbias summed to bias's shape (None without bias)."""
    import cupy

    B, Sq, H, D = q.shape
    Hk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s, visible, t = scores(q, k, mask, bias, scale, causal, softcap)
    s = cupy.where(visible, s, -cupy.inf)
    m = s.max(axis=-1, keepdims=True)
    m_safe = cupy.where(cupy.isfinite(m), m, 0.0)
    e = cupy.where(visible, cupy.exp(s - m_safe), 0.0)
    l = e.sum(axis=-1, keepdims=True)
    p = e / cupy.where(l > 0, l, 1.0)                                       # softmax
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
