"""Facts about the current CUDA device that the launchers need (cached per device)."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def _properties(device_id: int) -> tuple[int, int]:
    import cupy

    dev = cupy.cuda.Device(device_id)
    return int(dev.compute_capability), dev.attributes["MultiProcessorCount"]


def current() -> tuple[int, int]:
    """(compute capability as 80/90/..., multiprocessor count); rejects GPUs older than sm_80."""
    import cupy

    capability, sm_count = _properties(cupy.cuda.runtime.getDevice())
    if capability < 80:
        raise RuntimeError(
            f"dmattn_cupy's CUDA kernels need compute capability >= 8.0 (bf16 mma.sync, cp.async); "
            f"this GPU has {capability // 10}.{capability % 10}"
        )
    return capability, sm_count


def mma_choice() -> str:
    """Which kernels to use on Hopper, forward and backward: "auto" or "wgmma" (the warpgroup
    kernels wherever they exist: tile head dims 64 and 128; they measured faster than mma.sync at
    both) or "sync" (mma.sync everywhere). Set by DMATTN_CUPY_MMA; the tests run both kinds on one
    GPU this way."""
    choice = os.environ.get("DMATTN_CUPY_MMA", "auto")
    if choice not in ("auto", "wgmma", "sync"):
        raise ValueError(f"DMATTN_CUPY_MMA must be auto, wgmma or sync; got {choice!r}")
    return choice


def tma_enabled() -> bool:
    """Whether the wide Hopper forward (kernels_cu/fwd_ws.cu: Q, K and V by TMA, tma.cuh) may run
    where their strides allow: on unless DMATTN_CUPY_TMA=0 (then the narrow cp.async kernel runs)."""
    value = os.environ.get("DMATTN_CUPY_TMA", "1")
    if value not in ("0", "1"):
        raise ValueError(f"DMATTN_CUPY_TMA must be 0 or 1; got {value!r}")
    return value == "1"
