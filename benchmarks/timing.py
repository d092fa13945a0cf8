"""Timing, peak memory and device ceilings (GPU only; torch, triton and cupy imported lazily).

- :func:`median_ms` -- ``triton.testing.do_bench(fn, warmup, rep, return_mode="median")``, or
  CUDA events around warmed-up calls when triton is missing.
- :func:`peak_mem_gib` -- working set of one call: bytes of the inputs it reads plus
  ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
- :func:`cupy_allocations_from_torch` -- makes CuPy allocate from torch's caching allocator, so that
  torch's memory statistics see dmattn_cupy's allocations too.
- :func:`ceilings` -- device-to-device copy bandwidth (bytes read + written per second) and the
  bf16 8192^3 matmul rate, measured in the same run as the benchmark.
"""
from __future__ import annotations

import contextlib
import gc


def _cpu() -> bool:
    from .peers import on_cpu
    return on_cpu()


def _cpu_median_ms(fn, n: int = 5) -> float:
    import time
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return float(sorted(ts)[len(ts) // 2])


def median_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` (warmup and rep are milliseconds, as in do_bench)."""
    if _cpu():
        return _cpu_median_ms(fn)
    try:
        import triton.testing
    except ImportError:
        return _events_median_ms(fn, warmup, rep)
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def few_ms(fn, n: int = 3) -> float:
    """Median of n timed calls after one warm-up: for slow one-off work (mask construction)."""
    if _cpu():
        return _cpu_median_ms(fn, n)
    import torch
    fn()
    ms = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ms.append(s.elapsed_time(e))
    return float(sorted(ms)[len(ms) // 2])


def _events_median_ms(fn, warmup: int, rep: int) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup / est))):
        fn()
    times = []
    for _ in range(max(3, int(rep / est))):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    return float(ms[len(ms) // 2])


def free_memory():
    """Drop garbage and return cached blocks of torch and CuPy to the driver."""
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except ImportError:
        pass
    try:
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()
    except Exception:  # cupy missing or no device
        pass


def tensor_bytes(*tensors) -> int:
    total = 0
    for t in tensors:
        if t is not None:
            total += t.numel() * t.element_size()
    return total


def peak_mem_gib(fn, input_bytes: int = 0) -> float:
    """Inputs' bytes + the most memory allocated during one ``fn()`` above the level before it."""
    if _cpu():
        return None
    import torch
    torch.cuda.synchronize()
    gc.collect()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (input_bytes + max(0, peak - before)) / 2**30


@contextlib.contextmanager
def cupy_allocations_from_torch():
    """CuPy allocates device memory from torch's caching allocator inside the block, so that
    torch's memory statistics (:func:`peak_mem_gib`) see dmattn_cupy's allocations too.

    Each CuPy allocation holds a ``torch.uint8`` tensor of that size; freeing the CuPy array
    drops the tensor, which returns the block to torch's cache. Safe as long as CuPy and torch
    run on the same stream, which :func:`benchmarks.peers.on_torch_stream` ensures. Only the
    memory measurement runs this way: the timings use CuPy's own pool, as a user of the CuPy API
    does (the Python callback costs ~10 us per allocation, which a decode step would otherwise
    pay in the timing).
    """
    if _cpu():
        yield
        return
    import cupy
    import torch

    def _alloc(nbytes):
        t = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device="cuda")
        mem = cupy.cuda.UnownedMemory(t.data_ptr(), int(nbytes), t)
        return cupy.cuda.MemoryPointer(mem, 0)

    # dmattn_cupy's per-stream decode scratch is dropped on the way in and out, so that the calls
    # inside allocate it from torch and the measurement counts it.
    from dmattn_cupy._cuda.forward import release_workspaces

    release_workspaces()
    cupy.cuda.set_allocator(_alloc)
    try:
        yield
    finally:
        release_workspaces()
        cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)


def _copy_ms(nbytes: int, device: str) -> float:
    import torch
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), warmup=25, rep=100)


def _matmul_ms(n: int, device: str, dtype) -> float:
    import torch
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return median_ms(lambda: a @ b, warmup=25, rep=100)


def ceilings(quick: bool = False) -> dict:
    """Copy bandwidth (B/s, read + write) and bf16 matmul rate (FLOP/s) of this device."""
    import torch
    if _cpu():
        nbytes, n = 1 << 24, 256
        ms_copy, ms_mm = _copy_ms(nbytes, "cpu"), _matmul_ms(n, "cpu", torch.float32)
    else:
        nbytes, n = ((256 << 20) if quick else (1 << 30)), 8192
        ms_copy, ms_mm = _copy_ms(nbytes, "cuda"), _matmul_ms(n, "cuda", torch.bfloat16)
    free_memory()
    return {"copy_bandwidth_Bps": 2 * nbytes / (ms_copy * 1e-3),
            "matmul_flops": 2 * n**3 / (ms_mm * 1e-3), "copy_ms": ms_copy, "matmul_ms": ms_mm}


@contextlib.contextmanager
def nullcontext():
    yield
