"""The decode kernel (kernels_cu/fwd_decode.cu: short queries under a mask, keys gathered one by
one) against the float64 oracle. Every call here has a mask and at most 16 query rows per kv head
(GQA group x Sq), so dmattn_cupy.forward routes it to that kernel; outputs are poisoned first.
Skipped without a GPU.
"""

from __future__ import annotations

import numpy
import pytest

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu  # conftest skips it without a CUDA device

import dmattn_cupy  # noqa: E402
import gpu_reference as ref  # noqa: E402
from gpu_reference import make_inputs, randn, rel_err  # noqa: E402
from test_kernels_gpu import check_forward  # noqa: E402

from dmattn_cupy._cuda.config import decode_config, use_decode  # noqa: E402

DTYPES = ["bfloat16", "float16"]


def decoded(q, k):
    """A masked call on q, k takes the decode kernel (the tests below would silently test the tile
    kernel otherwise)."""
    return use_decode(q.shape[2] // k.shape[2], q.shape[1], k.shape[1], True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 160, 192, 256])
def test_head_dims(D, dtype):
    q, k, v, mask, bias = make_inputs(2, 1, 3001, 4, 2, D, dtype, (2, 2, 1, 3001), (2, 2, 1, 3001), density=0.1)
    assert decoded(q, k)
    check_forward(q, k, v, mask, bias, causal=True)


@pytest.mark.parametrize("group,Sq", [(1, 1), (2, 3), (8, 1), (8, 2), (1, 16)])
@pytest.mark.parametrize("aux_heads", ["H", "Hk", "1"])
def test_gqa_rows_and_head_broadcast(group, Sq, aux_heads):
    Hk = 2
    H = Hk * group
    n = {"H": H, "Hk": Hk, "1": 1}[aux_heads]
    q, k, v, mask, bias = make_inputs(2, Sq, 5000, H, Hk, 64, "bfloat16", (2, n, Sq, 5000), (2, n, Sq, 5000),
                                      density=0.05)
    assert decoded(q, k)
    check_forward(q, k, v, mask, bias, causal=True)


@pytest.mark.parametrize(
    "shape", [(2, 4, 3, 777), (1, 4, 3, 777), (2, 1, 3, 777), (2, 4, 1, 777), (1, 1, 1, 777), (1, 2, 3, 777)])
@pytest.mark.parametrize("bias_shape", ["same", "none", "full"])
@pytest.mark.parametrize("causal", [False, True])
def test_broadcast_shapes(shape, bias_shape, causal):
    bshape = {"same": shape, "none": None, "full": (2, 4, 3, 777)}[bias_shape]
    q, k, v, mask, bias = make_inputs(2, 3, 777, 4, 2, 64, "float16", shape, bshape, density=0.3)
    assert decoded(q, k)
    check_forward(q, k, v, mask, bias, causal=causal)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 37), (4, 3), (16, 16), (5, 100_000), (2, 129)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_causal(Sq, Sk, causal):
    q, k, v, mask, bias = make_inputs(1, Sq, Sk, 1, 1, 64, "bfloat16", (1, 1, Sq, Sk), (1, 1, Sq, Sk), density=0.5)
    out, lse = check_forward(q, k, v, mask, bias, causal=causal)
    if causal and Sq > Sk:  # the first Sq - Sk rows see no key
        assert bool((out[:, :Sq - Sk] == 0).all()) and bool(cupy.isneginf(lse[:, :, :Sq - Sk]).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_scale_float_mask_and_bias(dtype):
    q, k, v, mask, bias = make_inputs(1, 2, 4000, 8, 2, 128, dtype, (1, 2, 2, 4000), (1, 2, 2, 4000),
                                      mask_dtype=numpy.float16, bias_dtype=numpy.float32, density=0.2)
    check_forward(q, k, v, mask, bias, softcap=5.0, scale=0.3, causal=True)
    check_forward(q, k, v, mask.astype(numpy.float32), bias.astype(q.dtype))


def test_empty_rows_all_zero_mask_and_min_bias():
    q, k, v, mask, bias = make_inputs(1, 2, 3000, 4, 1, 64, "float16", (1, 4, 2, 3000), (1, 1, 2, 3000))
    mask[:, 1] = False  # head 1 sees nothing
    out, lse = check_forward(q, k, v, mask, bias)
    assert bool((out[:, :, 1] == 0).all()) and bool(cupy.isneginf(lse[:, 1]).all())
    out, lse = check_forward(q, k, v, cupy.zeros_like(mask), bias)
    assert bool((out == 0).all()) and bool(cupy.isneginf(lse).all())
    lowest = float(numpy.finfo(numpy.float16).min)
    bias[..., ::2] = lowest
    bias[..., 0, :] = lowest  # row 0: every key at the minimum, a uniform softmax
    check_forward(q, k, v, cupy.ones_like(mask), bias)


def test_strided_views_and_unaligned_mask():
    """Slices of a packed qkv, a zero-stride (expanded) bias, and a mask whose key stride is 2
    (read element by element, not in 16-byte chunks)."""
    B, Sk, H, D = 2, 2000, 4, 64
    kv = randn((B, Sk, 2, 2, D), "bfloat16")
    k, v = kv[:, :, 0], kv[:, :, 1]
    q = randn((B, 1, 3, H, D), "bfloat16")[:, :, 1]
    bias = cupy.broadcast_to(randn((B, 1, 1, Sk), "bfloat16"), (B, H, 1, Sk))
    wide = cupy.random.random((B, 2, 1, 2 * Sk)) < 0.2
    check_forward(q, k, v, wide[..., ::2], bias, causal=True)


def test_many_live_keys_per_split_and_dense():
    """Keys clustered so that some splits hold more live keys than one batch (several batches,
    the ring of two), splits with none, and a mask that keeps every key."""
    Sk = 50_000
    q, k, v, _, bias = make_inputs(1, 1, Sk, 2, 1, 128, "bfloat16", None, (1, 1, 1, Sk))
    mask = cupy.zeros((1, 1, 1, Sk), dtype=bool)
    mask[..., 1000:1700] = True
    mask[..., 30_000:30_003] = True
    check_forward(q, k, v, mask, bias, causal=True)
    check_forward(q, k, v, cupy.ones_like(mask), bias)  # every key live: 64-key batches throughout


def test_work_follows_the_kept_keys():
    """The kernel computes one batch per 64 live keys of each split (counter), so a sparse mask
    costs what it keeps; the result still matches."""
    from dmattn_cupy._cuda.forward import forward as cuda_forward
    from dmattn_cupy._validate import validate_attention

    Sk = 131_072
    q, k, v, _, bias = make_inputs(1, 1, Sk, 2, 1, 64, "bfloat16", None, (1, 1, 1, Sk))
    keep = numpy.zeros(Sk, dtype=bool)
    keep[numpy.random.default_rng(0).choice(Sk, 1024, replace=False)] = True
    keep[5000:5300] = True  # one dense run: several batches in its split
    mask = cupy.asarray(keep.reshape(1, 1, 1, Sk))

    def visited(m):
        counter = cupy.zeros(1, dtype=numpy.uint64)
        problem = validate_attention(q, k, v, m, bias, None, False, 0.0)
        cuda_forward(q, k, v, m, bias, problem, False, tiles_visited=counter)
        return int(counter.get()[0])

    sm_count = cupy.cuda.Device().attributes["MultiProcessorCount"]
    cfg = decode_config(head_dim=64, batch=1, kv_heads=1, rows=2, seqlen_k=Sk, sm_count=sm_count)
    per = cfg.keys_per_split
    want = sum(-(-int(keep[s:s + per].sum()) // 64) for s in range(0, Sk, per))
    assert visited(mask) == want
    assert visited(cupy.zeros_like(mask)) == 0
    assert visited(cupy.ones_like(mask)) == Sk // 64
    check_forward(q, k, v, mask, bias)


def test_repeated_calls_and_streams():
    """The arrival counters are left at zero by every call: back-to-back calls with new inputs,
    and calls on other streams, all merge correctly."""
    for _ in range(3):
        q, k, v, mask, bias = make_inputs(1, 1, 20_000, 4, 2, 64, "bfloat16", (1, 2, 1, 20_000),
                                          (1, 2, 1, 20_000), density=0.02)
        check_forward(q, k, v, mask, bias)
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(2)]
    outs = []
    for s in streams:
        with s:
            outs.append(dmattn_cupy.forward(q, k, v, mask, bias))
    for s in streams:
        s.synchronize()
    want, _ = ref.forward(q, k, v, mask, bias)
    for out in outs:
        assert rel_err(out, want) <= 2e-2


def test_threads_share_a_plan():
    """Threads calling forward with the same shapes share one cached plan, whose kernel record each
    call refills with its own pointers before launching (under the plan's lock): every thread, on
    its own stream and with its own inputs, gets its own answer."""
    import threading

    inputs = [make_inputs(1, 1, 20_000, 4, 2, 64, "bfloat16", (1, 2, 1, 20_000), (1, 2, 1, 20_000), density=0.02)
              for _ in range(4)]
    outs, errors = [None] * len(inputs), []

    def run(i):
        try:
            with cupy.cuda.Stream(non_blocking=True) as stream:
                for _ in range(20):
                    outs[i] = dmattn_cupy.forward(*inputs[i])
                stream.synchronize()
        except Exception as exc:  # reported below: pytest does not see a thread's exception
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for out, args in zip(outs, inputs):
        want, _ = ref.forward(*args)
        assert rel_err(out, want) <= 2e-2
