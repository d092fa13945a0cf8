"""Quickstart: dynamic-mask attention on NumPy (any machine) and, if there is one, on a GPU.

    python -m dmattn_cupy.quickstart

1. Build a bias (here random; in a model it is computed from the values) and turn it into a
   dynamic mask that keeps, for each query, the `window` keys with the largest bias.
2. Run forward and backward on NumPy arrays: the reference path.
3. With CuPy and a CUDA device, run the same call on the GPU in float16 and print the largest
   difference from the NumPy result.
"""

from __future__ import annotations

import numpy as np

import dmattn_cupy
from dmattn_cupy._arrays import cuda_device_available

BATCH, SEQLEN, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 1, 256, 4, 2, 64, 64


def _inputs(rng):
    """float32 arrays whose values are exact in float16, so both paths see the same numbers."""
    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float16).astype(np.float32)

    q = normal(BATCH, SEQLEN, HEADS, HEAD_DIM)
    k = normal(BATCH, SEQLEN, KV_HEADS, HEAD_DIM)
    v = normal(BATCH, SEQLEN, KV_HEADS, HEAD_DIM)
    bias = normal(BATCH, KV_HEADS, SEQLEN, SEQLEN)  # one bias per kv head, shared like k/v
    dout = normal(BATCH, SEQLEN, HEADS, HEAD_DIM)
    return q, k, v, bias, dout


def _attention(q, k, v, mask, bias, dout):
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, causal=True, return_lse=True)
    grads = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, causal=True)
    return (out, *grads)


def _compare_on_gpu(q, k, v, mask, bias, dout, reference) -> None:
    import cupy

    # q, k, v, dout in float16; bias stays float32 and the mask bool (both accepted on GPU).
    gpu = [cupy.asarray(x.astype(np.float16)) for x in (q, k, v)]
    try:
        results = _attention(*gpu, cupy.asarray(mask), cupy.asarray(bias),
                             cupy.asarray(dout.astype(np.float16)))
    except NotImplementedError as error:
        print(f"GPU: {error}")
        return
    for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), results, reference):
        error = np.abs(cupy.asnumpy(got).astype(np.float32) - want).max()
        print(f"GPU float16 vs NumPy float32: max |{name} difference| = {error:.2e}")


def main() -> None:
    q, k, v, bias, dout = _inputs(np.random.default_rng(0))
    mask = dmattn_cupy.topk_mask(bias, WINDOW, causal=True)
    print(f"q {q.shape}, k/v {k.shape}, bias {bias.shape}: each query keeps at most {WINDOW} "
          f"of {SEQLEN} keys, so {mask.mean():.1%} of all query-key scores are computed")

    reference = _attention(q, k, v, mask, bias, dout)
    out, dq, dk, dv, dbias = reference
    print(f"NumPy: out {out.shape}, dq {dq.shape}, dk {dk.shape}, dv {dv.shape}, "
          f"dbias {dbias.shape}; all finite: {all(np.isfinite(x).all() for x in reference)}")

    if cuda_device_available():
        _compare_on_gpu(q, k, v, mask, bias, dout, reference)
    else:
        print("GPU: skipped (needs CuPy and a CUDA device; pip install -e '.[cuda12]' or "
              "'.[cuda13]')")


if __name__ == "__main__":
    main()
