"""Backward probe (H100): time, reproducibility and correctness of the CUDA backward.

    python benchmarks/probe_bwd.py                 # both configs, checks first
    python benchmarks/probe_bwd.py --only seed_16k --skip-check
    python benchmarks/probe_bwd.py --random-mask   # skip topk_mask (seed: same row density;
                                                   # gqa8k: random 128 x 128 blocks, ~same tiles)

For each config (bf16, causal, bias randn (B, Hk, Sq, Sk), mask from dmattn_cupy.topk_mask):
backward median ms with deterministic=False / True (triton.testing.do_bench, or CUDA events),
their ratio, the default's time given the mask's BlockMap (dmattn_cupy.block_map, made outside the
timed calls), whether two deterministic runs agree bit for bit, the (query tile x head) steps the
dK/dV kernel computed and the tensor-core rate they amount to, and the kernel's tile config.
The check runs small versions of both configs (query chunks included) against the float64
oracle of tests/gpu_reference.py, default and deterministic.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import cupy
import numpy

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import gpu_reference as ref  # noqa: E402  (tests/gpu_reference.py)

import dmattn_cupy  # noqa: E402
from dmattn_cupy._cuda.backward import backward as cuda_backward  # noqa: E402
from dmattn_cupy._cuda.bwd_config import bwd_config  # noqa: E402
from dmattn_cupy._cuda.config import use_wgmma  # noqa: E402
from dmattn_cupy._cuda.device import current, mma_choice  # noqa: E402
from dmattn_cupy._validate import validate_attention  # noqa: E402

# name: (B, H, Hk, S, D, topk window, topk block, target backward ms)
CONFIGS = {
    "seed_16k": (1, 2, 1, 16384, 64, 1024, None, 0.9),
    "gqa8k_topk": (2, 16, 4, 8192, 128, 2048, 128, 2.5),
}
SMALL = {  # the check: same shapes of problem, small enough for the float64 oracle
    "seed-like": (1, 2, 1, 1100, 64, 128, None),
    "gqa-like": (2, 8, 2, 700, 128, 256, 128),
}
NAMES = ("dq", "dk", "dv", "dbias")
TOL = 5e-2  # bf16, as tests/test_kernels_bwd_gpu.py


def median_ms(fn) -> float:
    try:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    except ImportError:
        fn()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(20):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end))
        return float(sorted(times)[len(times) // 2])


def make_problem(B, H, Hk, S, D, window, block, random_mask=False, seed=0):
    cupy.random.seed(seed)
    q = ref.randn((B, S, H, D), "bfloat16")
    k, v = ref.randn((B, S, Hk, D), "bfloat16"), ref.randn((B, S, Hk, D), "bfloat16")
    bias = ref.randn((B, Hk, S, S), "bfloat16")
    t = time.perf_counter()
    if not random_mask:
        mask = dmattn_cupy.topk_mask(bias, window, causal=True, block=block)
    else:
        i = cupy.arange(S)[:, None]
        j = cupy.arange(S)[None, :]
        if block is None:  # each row keeps about `window` of its visible keys
            mask = cupy.random.random((B, Hk, S, S), dtype=cupy.float32) < cupy.minimum(1.0, window / (i + 1.0))
        else:  # random key blocks, about window / block of them per row block
            nb = math.ceil(S / block)
            bi = cupy.arange(nb)[:, None]
            p_keep = cupy.minimum(1.0, (window / block) / (bi + 1.0))
            keep = cupy.random.random((B, Hk, nb, nb), dtype=cupy.float32) < p_keep
            keep |= cupy.eye(nb, dtype=bool)
            mask = cupy.repeat(cupy.repeat(keep, block, axis=2), block, axis=3)[:, :, :S, :S]
        mask &= j <= i
    cupy.cuda.Device().synchronize()
    mask_s = time.perf_counter() - t
    dout = ref.randn(q.shape, "bfloat16")
    return q, k, v, mask, bias, dout, mask_s


def steps_computed(q, k, v, mask, bias, dout, out, lse) -> int:
    counter = cupy.zeros(1, dtype=numpy.uint64)
    problem = validate_attention(q, k, v, mask, bias, None, True, 0.0)
    cuda_backward(dout, q, k, v, out, lse, mask, bias, problem, False, tiles_visited=counter)
    return int(counter.get()[0])


def tile_config(q, k, mask, bias):
    B, S, H, D = q.shape
    return bwd_config(head_dim=D, batch=B, heads=H, kv_heads=k.shape[2], seqlen_q=S, seqlen_k=S,
                      mask_bytes=1, bias_bytes=2, bias_rows_reduced=False, dbias_atomic=False,
                      dbias_sharers=1, causal=True, sm_count=current()[1],
                      wgmma=use_wgmma(current()[0], D, mma_choice()))


def bitwise_equal(a, b) -> bool:
    return all(bool((x.view(numpy.uint16) == y.view(numpy.uint16)).all()) for x, y in zip(a, b))


def check(random_mask: bool) -> bool:
    ok = True
    for name, (B, H, Hk, S, D, window, block) in SMALL.items():
        q, k, v, mask, bias, dout, _ = make_problem(B, H, Hk, S, D, window, block, random_mask, seed=1)
        cfg = tile_config(q, k, mask, bias)
        out, lse = dmattn_cupy.forward(q, k, v, mask, bias, causal=True, return_lse=True)
        want = ref.backward(dout, q, k, v, mask, bias, causal=True)
        for det in (False, True):
            got = dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, causal=True, deterministic=det)
            errs = {n: ref.rel_err(g, w) for n, g, w in zip(NAMES, got, want)}
            nan = any(bool(cupy.isnan(g).any()) for g in got)
            good = not nan and all(e <= TOL for e in errs.values())
            ok &= good
            print(f"check {name:9s} D={D:3d} chunks={cfg.chunks} det={int(det)}: "
                  + " ".join(f"{n} {e:.1e}" for n, e in errs.items())
                  + (" NaN" if nan else "") + ("  ok" if good else "  FAIL"))
    return ok


def probe(name: str, random_mask: bool) -> None:
    B, H, Hk, S, D, window, block, target = CONFIGS[name]
    q, k, v, mask, bias, dout, mask_s = make_problem(B, H, Hk, S, D, window, block, random_mask)
    cfg = tile_config(q, k, mask, bias)
    t = cfg.tiles
    print(f"\n{name}: B={B} H={H} Hk={Hk} S={S} D={D} mask {'random' if random_mask else 'topk_mask'} "
          f"({mask_s:.1f} s to build)")
    print(f"  tiles: {'wgmma' if t.wgmma else 'mma.sync'}, {t.warps} warps, {t.block_m} rows x "
          f"{t.block_n} keys, smem {cfg.smem_bytes} B, {cfg.n_tiles} key tiles x {B * Hk} (b, hk) x {cfg.chunks} chunk(s) of {cfg.chunk_tiles} query tiles")
    out, lse = dmattn_cupy.forward(q, k, v, mask, bias, causal=True, return_lse=True)

    block_map = dmattn_cupy.block_map(mask)

    def run(det, bm=None):
        return dmattn_cupy.backward(dout, q, k, v, out, lse, mask, bias, causal=True, deterministic=det,
                                    block_map=bm)

    ms = median_ms(lambda: run(False))
    ms_det = median_ms(lambda: run(True))
    ms_map = median_ms(lambda: run(False, block_map))
    a, b = run(True), run(True)
    same = bitwise_equal(a, b)
    same_map = all(bool((x == y).all()) for x, y in zip(a, run(True, block_map)))
    c = run(False)
    diff = {n: ref.rel_err(x, y) for n, x, y in zip(NAMES, c, a)}
    steps = steps_computed(q, k, v, mask, bias, dout, out, lse)
    causal_steps = B * H * sum(cfg.m_tiles - min(cfg.m_tiles, n * t.block_n // t.block_m)
                               for n in range(cfg.n_tiles))
    flops = steps * 10.0 * t.block_m * t.block_n * D  # five products of (block_m x block_n x D)
    print(f"  backward      {ms:8.3f} ms   (target <= {target} ms)")
    print(f"  deterministic {ms_det:8.3f} ms   ratio {ms_det / ms:.2f} (target <= 1.3)")
    print(f"  with its map  {ms_map:8.3f} ms   (saves {ms - ms_map:.3f} ms: the mask column scans)")
    print(f"  deterministic runs bitwise equal: {same}; with the map equal: {same_map}")
    print("  default vs deterministic rel diff: " + " ".join(f"{n} {e:.1e}" for n, e in diff.items()))
    print(f"  steps computed {steps} of {causal_steps} causal ({steps / causal_steps:.1%}); "
          f"{flops / 1e9:.0f} GFLOP of tiles -> {flops / ms / 1e9:.0f} TFLOP/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS))
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--random-mask", action="store_true")
    args = parser.parse_args()
    print(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cupy", cupy.__version__,
          "nvrtc", ".".join(map(str, cupy.cuda.nvrtc.getVersion())))
    ok = True
    if not args.skip_check:
        ok = check(args.random_mask)
    for name in [args.only] if args.only else CONFIGS:
        probe(name, args.random_mask)
        cupy.get_default_memory_pool().free_all_blocks()
    print("\ncheck:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
