"""CUDA backend: CuPy arrays in, CuPy arrays out; kernels from kernels_cu/ compiled by NVRTC.

Inputs arrive validated by dmattn_cupy._validate; everything runs on CuPy's current stream.
"""

from .backward import backward
from .block_map import block_map
from .forward import forward
from .topk import topk_mask

__all__ = ["forward", "backward", "topk_mask", "block_map"]
