"""dmattn_cupy: Flash Dynamic Mask Attention as CUDA kernels loaded by CuPy.

NumPy arrays run a NumPy reference path (float32/float64); CuPy arrays (float16/bfloat16) run
the CUDA kernels. CuPy and torch are optional and imported only when used.
"""

from ._api import backward, block_map, forward, topk_mask
from ._block_map import BlockMap

__version__ = "0.1.0"

__all__ = ["forward", "backward", "topk_mask", "block_map", "BlockMap", "__version__"]
