"""The kernel instantiations that cover every head-dim tile, dtype and feature flag.

Used by the CI compile check (tests/test_kernels_compile.py: nvcc, registers and spills) and by
`warmup()`, which compiles the same set through NVRTC ahead of first use. Each entry names the
architectures it is built for: the portable kernels (and topk_mask) for sm_80 and sm_90, the
Hopper warpgroup (wgmma) forward and backward for sm_90a only.
"""

from __future__ import annotations

from .compile import get_kernel, kernel_name
from .config import TILE_HEAD_DIMS, WGMMA_HEAD_DIMS, WGMMA_WIDE_HEAD_DIMS

BF16, FP16 = "dmattn::bf16_t", "dmattn::fp16_t"

# (element type, tile head dim, mask bytes, bias bytes, causal, softcap): each head dim, both
# dtypes, mask sizes 0/1/2/4, bias sizes 0/2/4, causal and softcap each on and off.
ATTENTION_FLAGS = (
    (BF16, 32, 1, 2, True, False),
    (FP16, 64, 0, 0, False, False),
    (BF16, 64, 1, 2, True, False),
    (FP16, 96, 2, 4, False, True),
    (BF16, 128, 0, 0, True, False),
    (BF16, 128, 1, 2, True, False),
    (FP16, 128, 4, 0, False, True),
    (BF16, 192, 1, 2, False, False),
    (FP16, 256, 0, 4, True, True),
    (BF16, 256, 1, 2, True, False),
)
assert {flags[1] for flags in ATTENTION_FLAGS} == set(TILE_HEAD_DIMS)

# topk_mask (bias type, mask bytes, float mask): each bias dtype, mask sizes 0/1/2/4/8, integer
# and float masks.
TOPK_FLAGS = (
    (BF16, 0, False),
    (BF16, 1, False),
    (FP16, 1, False),
    ("float", 2, True),
    (BF16, 4, True),
    ("double", 8, False),
    ("float", 8, True),
)

# The backward's tiles also depend on mask + bias bytes (BwdTraits: 32 query rows instead of 64 at
# head dims <= 64 when they exceed 4 bytes per element): float32 mask and bias.
BWD_EXTRA_FLAGS = ((FP16, 64, 4, 4, False, False),)

PORTABLE = ("sm_80", "sm_90")
HOPPER = ("sm_90a",)

# source file -> [(kernel name, params struct, architectures)]
COVERING_SET = {
    "fwd.cu": [(kernel_name("fwd_kernel", *f), "FwdParams", PORTABLE) for f in ATTENTION_FLAGS]
    + [(kernel_name("fwd_combine_kernel", t), "FwdParams", PORTABLE) for t in (BF16, FP16)],
    "fwd_decode.cu": [(kernel_name("fwd_decode_kernel", *f), "FwdParams", PORTABLE)
                      for f in ATTENTION_FLAGS if f[2] > 0],  # the decode kernel needs a mask
    "fwd_wgmma.cu": [(kernel_name("fwd_wgmma_kernel", t, d, *f), "FwdParams", HOPPER)
                     for t, d, *f in ATTENTION_FLAGS if d in WGMMA_HEAD_DIMS],
    "fwd_ws.cu": [(kernel_name("fwd_ws_kernel", t, d, *f), "FwdParams", HOPPER)
                  for t, d, *f in ATTENTION_FLAGS if d in WGMMA_WIDE_HEAD_DIMS],
    # block maps (element bytes of a native mask; rows read as 16-byte chunks or element-wise)
    "block_map.cu": [(kernel_name("block_map_kernel", m, vec), "BlockMapParams", PORTABLE)
                     for m in (1, 2, 4) for vec in (True, False)],
    "bwd.cu": [(kernel_name("bwd_dkdv_kernel", t, d, False, *f), "BwdParams", PORTABLE)
               for t, d, *f in ATTENTION_FLAGS + BWD_EXTRA_FLAGS]
    + [(kernel_name("bwd_dkdv_kernel", t, d, True, *f), "BwdParams", HOPPER)
       for t, d, *f in ATTENTION_FLAGS if d in WGMMA_HEAD_DIMS]
    + [(kernel_name(k, t), "BwdParams", PORTABLE)
       for k in ("bwd_kv_bound_kernel", "bwd_preprocess_kernel", "bwd_convert_dq_kernel")
       for t in (BF16, FP16)],
    "topk.cu": [(kernel_name("topk_mask_kernel", *f), "TopkParams", PORTABLE) for f in TOPK_FLAGS],
}


def warmup() -> int:
    """Compiles the covering set with NVRTC for the current GPU; returns how many kernels."""
    from .device import current

    hopper = current()[0] == 90
    count = 0
    for source, kernels in COVERING_SET.items():
        for name, _, archs in kernels:
            if archs == HOPPER and not hopper:
                continue
            get_kernel(source, name, "sm_90a" if archs == HOPPER else None)
            count += 1
    return count
