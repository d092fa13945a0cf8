"""Benchmark configurations, mask builders and the byte/FLOP model behind the floors.

Everything here is plain Python + NumPy (torch tensors are accepted where noted), so the table,
the masks and the floors can be printed and tested without a GPU.

Configurations (all causal, bottom-right aligned, bias ``randn`` bf16 of shape (B, Hk, Sq, Sk)):

==============  ==  ==  ==  =====  ======  ===  ==========================================
name            B   H   Hk  Sq     Sk      D    mask
==============  ==  ==  ==  =====  ======  ===  ==========================================
seed_4k         1   2   1   4096   4096    64   top-1024 keys per row of the causal bias
seed_16k        1   2   1   16384  16384   64   top-1024
seed_32k        1   2   1   32768  32768   64   top-1024
gqa8k_topk      2   16  4   8192   8192    128  top-2048, smoothed to 128-key blocks
gqa8k_dense     2   16  4   8192   8192    128  none, no bias (plain causal attention)
decode_128k     1   2   1   1      131072  64   top-1024 of a (B, Hk, 1, Sk) bias
gqa8k_dens{d}   2   16  4   8192   8192    128  random 128x128 blocks, density d (below)
==============  ==  ==  ==  =====  ======  ===  ==========================================

Sparsity sweep masks (:func:`density_block_keep`): the (Sq x Sk) plane is cut into 128 x 128
tiles. For every (batch, kv head, query-block row) the key blocks that the causal mask leaves
(partly) visible are counted, n_vis; the diagonal block (the last visible one) is always kept and
``max(1, round(d * n_vis)) - 1`` further blocks are drawn uniformly without replacement from the
other visible blocks by ``numpy.random.default_rng(seed)``. The block mask is expanded to keys and
ANDed with causal. Density 1 keeps every visible block: the full causal mask, with bias.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

#: Sparsity sweep: fractions of the causally visible 128-key blocks kept per query-block row.
SWEEP_DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.0625)
SWEEP_BLOCK = 128


@dataclass(frozen=True)
class Config:
    """One benchmark problem. ``mask`` is "topk", "topk_block", "density" or "none"."""

    name: str
    batch: int
    heads: int
    kv_heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    mask: str = "topk"
    window: int | None = 1024
    block: int | None = None
    density: float | None = None
    has_bias: bool = True
    causal: bool = True
    seed: int = 0

    # ---- shapes ----------------------------------------------------------------------------
    @property
    def q_shape(self):
        return (self.batch, self.seqlen_q, self.heads, self.head_dim)

    @property
    def kv_shape(self):
        return (self.batch, self.seqlen_k, self.kv_heads, self.head_dim)

    @property
    def bias_shape(self):
        """Bias and mask shape: (B, Hk, Sq, Sk) -- (B, Hk, 1, Sk) for decode since Sq == 1."""
        return (self.batch, self.kv_heads, self.seqlen_q, self.seqlen_k)

    @property
    def has_mask(self) -> bool:
        return self.mask != "none"

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    # ---- counts ----------------------------------------------------------------------------
    def visible_pairs(self) -> int:
        """Number of (query, key) pairs the causal mask leaves visible, per (batch, head)."""
        return visible_pairs(self.seqlen_q, self.seqlen_k, self.causal)

    def visible_fraction(self) -> float:
        return self.visible_pairs() / (self.seqlen_q * self.seqlen_k)

    def expected_density(self) -> float | None:
        """Kept fraction of the causally visible pairs the mask should have (None: data-dependent).

        top-k keeps min(window, visible keys) per row; the sweep keeps about its density; block
        smoothing of top-k depends on the bias (0.124 for gqa8k_topk on randn bias).
        """
        if self.mask == "none":
            return 1.0
        if self.mask == "density":
            return float(self.density)
        if self.mask == "topk":
            rows = np.arange(self.seqlen_q, dtype=np.int64) + (self.seqlen_k - self.seqlen_q) + 1
            vis = np.clip(rows, 0, self.seqlen_k) if self.causal else np.full(self.seqlen_q,
                                                                               self.seqlen_k)
            return float(np.minimum(vis, self.window).sum() / max(vis.sum(), 1))
        return None

    def flops(self, pass_: str = "fwd", density: float = 1.0) -> float:
        """Tensor-core FLOPs: 4*B*H*Sq*Sk*D * visible fraction * density; backward = 2.5x fwd."""
        fwd = 4.0 * self.batch * self.heads * self.visible_pairs() * self.head_dim * density
        return fwd * (3.5 if pass_ == "fwd_bwd" else 1.0)

    def bytes(self, pass_: str = "fwd", dtype_bytes: int = 2, mask_bytes: int = 1,
              density: float = 1.0, mask_read: float = 1.0) -> float:
        """Bytes that must cross HBM at least once.

        Forward: q, k, v read, out written, plus the causally visible part of the mask (1 byte)
        read, and of the bias (dtype) the kept fraction `density` (a skipped tile's bias is never
        needed). mask_read: the fraction of that mask read (a call given the mask's block map
        reads only the kept tiles': `density`). Forward+backward adds: q, k, v, out, dout read, dq, dk, dv written, bias (kept
        part) and mask read again, dbias written in full (it has bias's shape), lse.
        """
        q = self.batch * self.seqlen_q * self.heads * self.head_dim
        kv = self.batch * self.seqlen_k * self.kv_heads * self.head_dim
        bm_full = self.batch * self.kv_heads * self.seqlen_q * self.seqlen_k
        bm_vis = self.batch * self.kv_heads * self.visible_pairs()
        bias = bm_vis * dtype_bytes * density if self.has_bias else 0
        mask = bm_vis * mask_bytes * mask_read if self.has_mask else 0
        fwd = (2 * q + 2 * kv) * dtype_bytes + bias + mask
        if pass_ != "fwd_bwd":
            return float(fwd)
        lse = self.batch * self.heads * self.seqlen_q * 4
        bwd = (3 * q + 2 * kv) * dtype_bytes  # q, out, dout, k, v read
        bwd += (q + 2 * kv) * dtype_bytes  # dq, dk, dv written
        bwd += bias + mask + (bm_full * dtype_bytes if self.has_bias else 0) + 2 * lse
        return float(fwd + bwd + lse)

    def floor_ms(self, pass_: str, bandwidth: float, matmul_rate: float,
                 density: float = 1.0, mask_read: float = 1.0) -> float:
        """max(bytes / bandwidth, FLOPs / matmul rate) in milliseconds (rates in B/s, FLOP/s)."""
        return 1e3 * max(self.bytes(pass_, density=density, mask_read=mask_read) / bandwidth,
                         self.flops(pass_, density) / matmul_rate)

    # ---- a small version for the correctness check -----------------------------------------
    def small(self) -> "Config":
        """The same structure at a size a float64 reference handles in milliseconds."""
        sq = min(self.seqlen_q, 1024)
        sk = min(self.seqlen_k, 4096) if self.seqlen_q == 1 else min(self.seqlen_k, 1024)
        heads = min(self.heads, 8)
        kv_heads = max(1, heads * self.kv_heads // self.heads)
        window = None
        if self.window is not None:
            window = max(16, self.window * sk // self.seqlen_k)
        name = self.name if self.name.endswith("@small") else self.name + "@small"
        return dataclasses.replace(self, name=name, batch=min(self.batch, 1),
                                   heads=heads, kv_heads=kv_heads, seqlen_q=sq, seqlen_k=sk,
                                   window=window)

    def describe(self) -> str:
        if self.mask == "topk":
            m = f"top-{self.window}"
        elif self.mask == "topk_block":
            m = f"top-{self.window}, {self.block}-key blocks"
        elif self.mask == "density":
            m = f"random {SWEEP_BLOCK}x{SWEEP_BLOCK} blocks, density {self.density:g}"
        else:
            m = "no mask"
        return (f"B={self.batch} H={self.heads} Hk={self.kv_heads} Sq={self.seqlen_q} "
                f"Sk={self.seqlen_k} D={self.head_dim}, causal, "
                f"{'bias' if self.has_bias else 'no bias'}, {m}")


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool = True) -> int:
    """Pairs (i, j) with j <= i + Sk - Sq (bottom-right causal), 0 <= j < Sk."""
    if not causal:
        return seqlen_q * seqlen_k
    rows = np.arange(seqlen_q, dtype=np.int64) + (seqlen_k - seqlen_q) + 1
    return int(np.clip(rows, 0, seqlen_k).sum())


def _density_name(d: float) -> str:
    return f"gqa8k_dens{d:g}"


CONFIGS: dict[str, Config] = {c.name: c for c in [
    Config("seed_4k", 1, 2, 1, 4096, 4096, 64, "topk", 1024),
    Config("seed_16k", 1, 2, 1, 16384, 16384, 64, "topk", 1024),
    Config("seed_32k", 1, 2, 1, 32768, 32768, 64, "topk", 1024),
    Config("gqa8k_topk", 2, 16, 4, 8192, 8192, 128, "topk_block", 2048, block=128),
    Config("gqa8k_dense", 2, 16, 4, 8192, 8192, 128, "none", None, has_bias=False),
    Config("decode_128k", 1, 2, 1, 1, 131072, 64, "topk", 1024),
    *[Config(_density_name(d), 2, 16, 4, 8192, 8192, 128, "density", None,
             block=SWEEP_BLOCK, density=d) for d in SWEEP_DENSITIES],
]}

SUITES: dict[str, list[str]] = {
    "seed": ["seed_4k", "seed_16k", "seed_32k"],
    "gqa": ["gqa8k_topk", "gqa8k_dense"],
    "decode": ["decode_128k"],
    "sparsity": [_density_name(d) for d in SWEEP_DENSITIES],
}
SUITES["all"] = [n for s in ("seed", "gqa", "decode", "sparsity") for n in SUITES[s]]


def suite_configs(suite: str) -> list[Config]:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {sorted(SUITES)}")
    return [CONFIGS[n] for n in SUITES[suite]]


def config_table() -> str:
    """Markdown table of every configuration (for the README and notebooks)."""
    lines = ["| name | B | H | Hk | Sq | Sk | D | mask |", "|---|---|---|---|---|---|---|---|"]
    for c in CONFIGS.values():
        lines.append(f"| {c.name} | {c.batch} | {c.heads} | {c.kv_heads} | {c.seqlen_q} | "
                     f"{c.seqlen_k} | {c.head_dim} | {c.describe().split(', ', 2)[-1]} |")
    return "\n".join(lines)


# ---- mask builders -------------------------------------------------------------------------
def causal_keep(seqlen_q: int, seqlen_k: int, xp=np):
    """Bool (Sq, Sk): True where key j is visible to query i, bottom-right aligned."""
    i = xp.arange(seqlen_q)[:, None]
    j = xp.arange(seqlen_k)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def density_block_keep(batch: int, kv_heads: int, seqlen_q: int, seqlen_k: int,
                       density: float, block: int = SWEEP_BLOCK, seed: int = 0) -> np.ndarray:
    """Bool (B, Hk, ceil(Sq/block), ceil(Sk/block)) block mask of the sparsity sweep.

    Per (batch, kv head, query-block row): keep the diagonal block plus
    ``max(1, round(density * n_vis)) - 1`` other causally visible blocks drawn without
    replacement (fixed seed), so every row keeps exactly max(1, round(density * n_vis)) blocks.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    nqb, nkb = -(-seqlen_q // block), -(-seqlen_k // block)
    rng = np.random.default_rng(seed)
    keep = np.zeros((batch, kv_heads, nqb, nkb), dtype=bool)
    for r in range(nqb):
        q_last = min((r + 1) * block, seqlen_q) - 1
        last_key = q_last + seqlen_k - seqlen_q  # last visible key of the block row
        n_vis = min(nkb, last_key // block + 1) if last_key >= 0 else 0
        if n_vis == 0:
            continue
        n_keep = max(1, round(density * n_vis))
        diag = n_vis - 1
        for b in range(batch):
            for h in range(kv_heads):
                others = rng.permutation(diag)[: n_keep - 1]
                keep[b, h, r, others] = True
                keep[b, h, r, diag] = True
    return keep


def expand_block_mask(blocks, seqlen_q: int, seqlen_k: int, block: int = SWEEP_BLOCK,
                      causal: bool = True):
    """Expand a (..., nqb, nkb) block mask to (..., Sq, Sk) and AND it with causal.

    Works on NumPy/CuPy arrays and on torch tensors (same device as ``blocks``).
    """
    if hasattr(blocks, "repeat_interleave"):  # torch
        import torch
        full = blocks.repeat_interleave(block, -2).repeat_interleave(block, -1)
        full = full[..., :seqlen_q, :seqlen_k]
        if causal:
            i = torch.arange(seqlen_q, device=blocks.device)[:, None]
            j = torch.arange(seqlen_k, device=blocks.device)[None, :]
            full = full & (j <= i + (seqlen_k - seqlen_q))
        return full.contiguous()
    xp = _array_module(blocks)
    full = xp.repeat(xp.repeat(blocks, block, axis=-2), block, axis=-1)[..., :seqlen_q, :seqlen_k]
    if causal:
        full = full & causal_keep(seqlen_q, seqlen_k, xp)
    return xp.ascontiguousarray(full)


def mask_density(mask, seqlen_q: int, seqlen_k: int, causal: bool = True) -> float:
    """Kept fraction of the causally visible pairs (mask must already include causal)."""
    n = 1
    for s in mask.shape[:-2]:
        n *= int(s)
    return count_kept(mask) / (n * visible_pairs(seqlen_q, seqlen_k, causal))


def count_kept(mask, chunk: int = 1 << 26) -> int:
    """True entries of a bool mask (NumPy, CuPy or torch), summed `chunk` elements at a time:
    torch's sum first copies a bool tensor to int64, 8 bytes per element (8 GiB at 32k x 32k)."""
    flat = mask.reshape(-1)
    return sum(int(flat[i:i + chunk].sum()) for i in range(0, flat.shape[0], chunk))


def skipped_tile_fraction(mask, tile_q: int = 64, tile_k: int = 64, seqlen_q=None,
                          seqlen_k=None, causal: bool = True) -> float:
    """Fraction of causally visible (tile_q x tile_k) tiles whose mask is all zero (NumPy)."""
    m = np.asarray(mask, dtype=bool)
    sq, sk = m.shape[-2:]
    nq, nk = -(-sq // tile_q), -(-sk // tile_k)
    pad = np.zeros(m.shape[:-2] + (nq * tile_q, nk * tile_k), dtype=bool)
    pad[..., :sq, :sk] = m
    tiles = pad.reshape(m.shape[:-2] + (nq, tile_q, nk, tile_k)).any(axis=(-3, -1))
    vis = np.ones((sq, sk), dtype=bool)
    if causal:
        vis = causal_keep(sq, sk)
    vpad = np.zeros((nq * tile_q, nk * tile_k), dtype=bool)
    vpad[:sq, :sk] = vis
    vtiles = vpad.reshape(nq, tile_q, nk, tile_k).any(axis=(1, 3))
    n_vis = vtiles.sum() * (tiles.size // vtiles.size)
    return float(((~tiles) & vtiles).sum() / max(n_vis, 1))


def _array_module(a):
    mod = type(a).__module__.split(".")[0]
    if mod == "cupy":
        import cupy
        return cupy
    return np


def round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)
