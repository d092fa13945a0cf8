"""Build notebooks/*.ipynb from the cell sources below, execute them, save them with outputs.

    python notebooks/build_notebooks.py [1 2 3 4]

The notebooks are committed executed (so they read well on GitHub); edit the cells here and
rerun this script rather than editing the .ipynb files by hand.
"""
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / "notebooks"

SETUP = '''import sys, pathlib
root = pathlib.Path.cwd().resolve()
while not (root / "dmattn_cupy").is_dir() and root != root.parent:
    root = root.parent
sys.path.insert(0, str(root))  # run from a source checkout without installing

import numpy as np
import matplotlib.pyplot as plt
import dmattn_cupy as dm'''

GPU_PROBE = '''def gpu_available():
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or no driver / device
        return False

HAVE_GPU = gpu_available()
print("GPU available:", HAVE_GPU)'''


def md(s):
    return new_markdown_cell(s.strip("\n"))


def code(s):
    return new_code_cell(s.strip("\n"))


# ---------------------------------------------------------------------------------------------
nb1 = [
    md('''
# 01 · Quickstart

**dmattn_cupy** is Flash Dynamic Mask Attention: attention whose score matrix gets an additive
**bias** and a boolean **mask** chosen per query row (for instance the top-k keys by bias), so the
kernel can skip every tile of keys the mask hides.

For q `(B, Sq, H, D)`, k and v `(B, Sk, Hk, D)` (grouped-query attention when `Hk < H`), and a
mask and bias broadcastable to `(B, H, Sq, Sk)`:

$$ s = \\text{scale}\\cdot q k^\\top + \\text{bias}, \\quad s \\leftarrow -\\infty \\text{ where mask} = 0
\\text{ or (causal) } j > i + S_k - S_q, \\quad \\text{out} = \\operatorname{softmax}(s)\\, v $$

NumPy arrays run a NumPy reference path (float32/float64, any machine); CuPy arrays run the CUDA
kernels (float16/bfloat16). This notebook runs on a CPU; the last section runs on a GPU when one is
there.
'''),
    code(SETUP),
    md('''
## Forward on NumPy

A small problem: 2 query heads sharing 1 key/value head, a random bias, and a mask keeping the 16
keys with the largest bias in each row (after causal masking), built by `dm.topk_mask` (on CuPy
arrays a radix-select kernel that gives the same mask bit for bit, in ~1.4 ms for a 16k x 16k bias).
'''),
    code('''rng = np.random.default_rng(0)
B, Sq, Sk, H, Hk, D = 2, 64, 64, 2, 1, 32
q = rng.standard_normal((B, Sq, H, D))
k = rng.standard_normal((B, Sk, Hk, D))
v = rng.standard_normal((B, Sk, Hk, D))
bias = rng.standard_normal((B, Hk, Sq, Sk))           # one bias per kv head
mask = dm.topk_mask(bias, 16, causal=True)             # bool, bias's shape

out, lse = dm.forward(q, k, v, mask, bias, causal=True, return_lse=True)
print("out", out.shape, out.dtype, "| lse", lse.shape)
print("keys kept per row (first 20 rows):", mask[0, 0].sum(-1)[:20])'''),
    md('''
## Check it against the formula

The same attention written out in a few lines of NumPy: GQA maps query head `h` to kv head
`h // (H // Hk)`.
'''),
    code('''def attention_by_hand(q, k, v, mask, bias, causal=True):
    g = q.shape[2] // k.shape[2]
    qh = q.transpose(0, 2, 1, 3)                                  # (B, H, Sq, D)
    kh = np.repeat(k.transpose(0, 2, 1, 3), g, axis=1)            # (B, H, Sk, D)
    vh = np.repeat(v.transpose(0, 2, 1, 3), g, axis=1)
    s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + np.repeat(bias, g, axis=1)
    sq, sk = s.shape[-2:]
    keep = np.repeat(mask, g, axis=1)
    if causal:
        keep = keep & (np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq)
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3)

ref = attention_by_hand(q, k, v, mask, bias)
print("max |out - by hand| =", np.abs(out - ref).max())'''),
    md('''
## Backward

`dm.backward` takes the forward's `out` and `lse` and returns `(dq, dk, dv, dbias)`; `dk`/`dv` sum
over the query heads of their group, `dbias` has the bias's shape. A finite-difference check of one
bias entry and one query entry of the loss `L = sum(out * dout)`:
'''),
    code('''dout = rng.standard_normal(out.shape)
dq, dk, dv, dbias = dm.backward(dout, q, k, v, out, lse, mask, bias, causal=True)
print("dq", dq.shape, "dk", dk.shape, "dv", dv.shape, "dbias", dbias.shape)

def loss(q, bias):
    return np.sum(dm.forward(q, k, v, mask, bias, causal=True) * dout)

eps = 1e-6
b, h, i, j = 0, 0, 40, int(np.flatnonzero(mask[0, 0, 40])[0])   # a kept entry
e = np.zeros_like(bias); e[b, h, i, j] = eps
fd_bias = (loss(q, bias + e) - loss(q, bias - e)) / (2 * eps)
e = np.zeros_like(q); e[1, 10, 1, 3] = eps
fd_q = (loss(q + e, bias) - loss(q - e, bias)) / (2 * eps)
print(f"dbias: analytic {dbias[b, h, i, j]:+.8f}  finite difference {fd_bias:+.8f}")
print(f"dq   : analytic {dq[1, 10, 1, 3]:+.8f}  finite difference {fd_q:+.8f}")
print("dbias is exactly zero where the mask hides a key:", np.all(dbias[~mask] == 0))'''),
    md('''
## On a GPU: CuPy arrays, and torch tensors through DLPack

The same calls on CuPy arrays run the CUDA kernels (float16 or bfloat16 inputs). torch tensors
convert to CuPy without a copy through `cupy.from_dlpack`. This cell only runs where CuPy sees a
GPU; on a CPU machine it says so and does nothing.
'''),
    code(GPU_PROBE),
    code('''if HAVE_GPU:
    import cupy as cp
    qg, kg, vg = (cp.asarray(x, dtype=cp.float16) for x in (q, k, v))
    bg = cp.asarray(bias, dtype=cp.float16)
    mg = dm.topk_mask(bg, 16, causal=True)
    og, lg = dm.forward(qg, kg, vg, mg, bg, causal=True, return_lse=True)
    # reference on the same fp16-rounded values, in float64
    r64 = dm.forward(*(cp.asnumpy(x).astype(np.float64) for x in (qg, kg, vg)),
                     cp.asnumpy(mg), cp.asnumpy(bg).astype(np.float64), causal=True)
    err = np.linalg.norm(cp.asnumpy(og).astype(np.float64) - r64) / np.linalg.norm(r64)
    print("CUDA fp16 vs float64 reference, relative error:", f"{err:.2e}")
    grads = dm.backward(cp.asarray(dout, dtype=cp.float16), qg, kg, vg, og, lg, mg, bg, causal=True)
    print("CUDA gradients:", [g.shape for g in grads])
    try:
        import torch
    except ImportError:
        torch = None
        print("torch not installed: DLPack example skipped")
    try:
        qt = torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.bfloat16)
        kt = torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
        bt = torch.randn(1, 2, 256, 256, device="cuda", dtype=torch.bfloat16)
        qc, kc, bc = cp.from_dlpack(qt), cp.from_dlpack(kt), cp.from_dlpack(bt)  # zero-copy
        with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            oc = dm.forward(qc, kc, kc, dm.topk_mask(bc, 64, causal=True), bc, causal=True)
        print("torch -> CuPy -> torch:", torch.from_dlpack(oc).shape, torch.from_dlpack(oc).dtype)
    except Exception as exc:  # report, do not hide
        if torch is not None:
            print("DLPack example failed:", type(exc).__name__, exc)
else:
    print("No CUDA device here: the CuPy/torch part is skipped (everything above ran on NumPy).")'''),
]

# ---------------------------------------------------------------------------------------------
nb2 = [
    md('''
# 02 · Dynamic masks

A dynamic mask is computed from the data at run time, typically from the bias: each query keeps the
`window` keys with the largest bias among those it may see. The kernel works on tiles of queries
and keys; a tile whose mask is all zero is skipped, so **what the kernel saves depends on how the
kept keys cluster into tiles**. This notebook builds masks with `dm.topk_mask`, smooths them to
key blocks, and shows which tiles a kernel could skip.
'''),
    code(SETUP + '''
from matplotlib.colors import ListedColormap
from benchmarks.configs import causal_keep, mask_density, skipped_tile_fraction

S, TILE = 1024, 64
rng = np.random.default_rng(0)'''),
    md('''
## Top-k of a random bias

With an unstructured bias the kept keys scatter across every tile: the mask is sparse, but almost
no 64×64 tile is entirely empty.
'''),
    code('''bias = rng.standard_normal((1, 1, S, S)).astype(np.float32)
m_topk = dm.topk_mask(bias, 128, causal=True)

def tile_map(mask, tile=TILE):
    """True where a (tile x tile) block of the mask keeps at least one key."""
    s = mask.shape[-1]
    return mask.reshape(s // tile, tile, s // tile, tile).any(axis=(1, 3))

def show(mask, title):
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.4))
    ax[0].imshow(mask, cmap="Greys", interpolation="nearest")
    ax[0].set_title(f"{title}\\nmask (black = kept), density {mask_density(mask[None, None], S, S):.3f}")
    ax[0].set_xlabel("key index j"); ax[0].set_ylabel("query index i")
    visible = tile_map(causal_keep(S, S))
    t = tile_map(mask)
    img = np.where(~visible, 0, np.where(t, 2, 1))
    cmap = ListedColormap(["white", "#fdae6b", "#08519c"])
    ax[1].imshow(img, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    skipped = skipped_tile_fraction(mask[None, None], TILE, TILE)
    ax[1].set_title(f"{TILE}x{TILE} tiles: blue = computed, orange = skipped\\n"
                    f"{100 * skipped:.0f}% of the causally visible tiles skipped (white: above the diagonal)",
                    fontsize=9)
    ax[1].set_xlabel("key tile"); ax[1].set_ylabel("query tile")
    fig.tight_layout(); plt.show()

show(m_topk[0, 0], "top-128 of a random bias")'''),
    md('''
## Block smoothing

`topk_mask(..., block=128)` keeps a whole block of 128 keys when more than half of its keys were
kept, and drops it otherwise. The mask becomes tile-aligned: whole tiles vanish and the kernel
skips them.
'''),
    code('''m_block = dm.topk_mask(bias, 256, causal=True, block=128)
show(m_block[0, 0], "top-256, smoothed to 128-key blocks")'''),
    md('''
Rows near the bottom keep nothing: once a row sees many more keys than twice the window, the top-k
of an unstructured bias spreads so thinly that no block reaches half, and the row attends to no key
(its output is defined as 0). The benchmark's `gqa8k_topk` mask has this property too.
'''),
    md('''
## Block maps: find the skipped tiles once

To skip tiles, the kernel must first learn which tiles are empty. Found from the mask itself, that
is a pass over every byte of it on **every** call: gqa8k's causal bool mask (B=2, H=16, S=8192) is
270 MB, about 0.1 ms per call at an H100's read rate. A `dm.BlockMap` keeps the result of that pass:
two bits per (mask row, 128-key tile), one set where the row keeps a key in that tile ("any"), one
where it keeps every key of it ("full").

* `dm.block_map(mask)` makes it from any mask; `dm.topk_mask(..., return_block_map=True)` returns
  `(mask, block_map)`, and on the GPU the top-k kernel writes the map while it writes the mask, so
  the map costs no extra pass.
* `bits` is uint32 of shape `mask.shape[:3] + (2, words)`, `words = ceil(ceil(Sk/128)/32)`: the
  "any" words, then the "full" words, of each row; `.tiles()` and `.full_tiles()` unpack them to
  bool `(..., rows, key tiles)` and `.density()` is the fraction of (row, tile) pairs with a key.

OR-ing the "any" bits over the rows of a query tile gives the tile picture above, so the kernel
never reads the mask to decide what to skip. Where no row of the query tile keeps a tile in part
(any but not full), the bits say everything the mask would: the kernel then reads no mask rows for
that tile and tests no score; a row whose "any" bit is clear drops the tile in its softmax. Top-k
smoothed to 128-key blocks is such a mask everywhere but on the causal diagonal.
'''),
    code('''m_block, bm = dm.topk_mask(bias, 256, causal=True, block=128, return_block_map=True)
print("mask", m_block.shape, m_block.dtype, f"{m_block.nbytes:,} bytes")
print("bits", bm.bits.shape, bm.bits.dtype, f"{bm.bits.nbytes:,} bytes;  mask_shape", bm.mask_shape)
print(f"density: {bm.density():.3f} of (row, 128-key tile) pairs keep a key")
partial = bm.tiles() & ~bm.full_tiles()
print(f"kept in part: {partial.sum() / bm.tiles().sum():.3f} of them (the causal diagonal's tiles)")
print("same as dm.block_map(mask):", bool((bm.tiles() == dm.block_map(m_block).tiles()).all()))

rows_tiles = bm.tiles()[0, 0]                            # (S rows, S/128 key tiles)
tiles_128 = rows_tiles.reshape(S // 128, 128, -1).any(axis=1)  # OR over each 128-row query tile
print("OR over rows == tile_map(mask, 128):", bool((tiles_128 == tile_map(m_block[0, 0], 128)).all()))

fig, ax = plt.subplots(1, 2, figsize=(10, 4.4))
ax[0].imshow(rows_tiles, cmap="Greys", aspect="auto", interpolation="nearest")
ax[0].set_title("bm.tiles()[0, 0]: one bit per (row, 128-key tile)\\n(black = the row keeps a key there)",
                fontsize=9)
ax[0].set_xlabel("key tile"); ax[0].set_ylabel("query row i")
ax[1].imshow(tiles_128, cmap="Greys", interpolation="nearest")
ax[1].set_title("OR over 128-row query tiles: the 128x128 tiles a kernel computes", fontsize=9)
ax[1].set_xlabel("key tile"); ax[1].set_ylabel("query tile")
fig.tight_layout(); plt.show()'''),
    md('''
Pass the map to `dm.forward(..., block_map=bm)` with the mask it describes. Make it once and reuse it
for every call with that mask (each layer, each step that keeps the mask), as FlexAttention's
`BlockMask` is made once. On an H100 (bf16, gqa8k: B=2, H=16, Hk=4, S=8192, D=128, causal, bias;
same process) the forward went from 0.52-0.54 to 0.41-0.43 ms with the top-k smoothed mask; with
block-sparse masks of density 1/16 from 0.231 to 0.137 ms, 1/8 from 0.305 to 0.198-0.209 ms, and at
density 1 from 1.25 to 1.15-1.18 ms.

`dm.backward(..., block_map=bm)` takes the same map: each key tile of the CUDA backward then finds
the query tiles that keep a key in it from the map's bits (a word per row) instead of scanning its
column of the mask (H100, gqa8k_topk's backward: 2.52 -> 2.41 ms).

The map must describe the mask passed with it: `forward` and `backward` check the shapes, not the
bits, and a stale map (a mask changed after its map was made) gives undefined results on the GPU. On
the NumPy path the map is validated and the reference computes the exact function regardless, so
outputs and gradients are the same with or without it:
'''),
    code('''q = rng.standard_normal((1, S, 2, 32)).astype(np.float32)      # (B, Sq, H, D)
kv = rng.standard_normal((2, 1, S, 1, 32)).astype(np.float32)  # k, v: (B, Sk, Hk, D)
out_map = dm.forward(q, kv[0], kv[1], m_block, bias, causal=True, block_map=bm)
out, lse = dm.forward(q, kv[0], kv[1], m_block, bias, causal=True, return_lse=True)
print("same output with and without the map:", np.array_equal(out_map, out))
dout = rng.standard_normal(out.shape).astype(np.float32)
grads_map = dm.backward(dout, q, kv[0], kv[1], out, lse, m_block, bias, causal=True, block_map=bm)
grads = dm.backward(dout, q, kv[0], kv[1], out, lse, m_block, bias, causal=True)
print("same gradients with and without the map:", all(np.array_equal(a, b) for a, b in zip(grads_map, grads)))

try:  # a map made for another mask shape is refused
    dm.forward(q[:, :512], kv[0], kv[1], m_block[:, :, :512], bias[:, :, :512], causal=True, block_map=bm)
except ValueError as exc:
    print("ValueError:", exc)'''),
    md('''
From torch, `dmattn_cupy.torch.block_map(mask)` gives the same map as an int32 tensor on the mask's
device, and `flash_dmattn_func(..., attn_mask=mask, block_map=bm_t)` takes it (zero copy into the
kernels; autograd hands it to the backward too, and `torch.compile` works as without it). A model
whose layers share one mask per step makes the map once per step instead of paying the mask pass in
every layer's forward and backward:
'''),
    code('''try:
    import torch
    from dmattn_cupy.torch import block_map as torch_block_map, flash_dmattn_func
except ImportError:
    torch = None
    print("torch not installed: skipped")
if torch is not None:
    mask_t = torch.from_numpy(m_block)
    bm_t = torch_block_map(mask_t)
    print("torch map:", bm_t.dtype, tuple(bm_t.shape), "same bits:",
          bool((bm_t.numpy().view(np.uint32) == bm.bits).all()))
    qt, kt, vt, bt = (torch.from_numpy(x) for x in (q, kv[0], kv[1], bias))
    out_t = flash_dmattn_func(qt, kt, vt, attn_mask=mask_t, attn_bias=bt, is_causal=True, block_map=bm_t)
    print("same output as dm.forward:", np.allclose(out_t.numpy(), out))'''),
    md('''
## A bias with structure: Doge-style dynamic bias from the values

In Doge's dynamic mask attention the bias is a function of the **values**: one learned score per key
(`bias_j = f(v_j)`), shared by every query row. Top-k of such a bias picks the same important keys
for every row (up to causality), so the kept keys line up in columns, and with block smoothing most
tiles are skipped.
'''),
    code('''v = rng.standard_normal((S, 16))
w = rng.standard_normal(16)
importance = np.log1p(np.exp(v @ w))          # softplus(v_j . w): one score per key
# keys arrive in bursts: importance is smooth over neighbouring keys
importance = np.convolve(importance, np.ones(64) / 64, mode="same")
bias_doge = np.broadcast_to(importance, (1, 1, S, S)).astype(np.float32)
m_doge = dm.topk_mask(bias_doge, 256, causal=True, block=128)
show(m_doge[0, 0], "Doge-style bias f(v_j), top-256, 128-key blocks")'''),
    md('''
## How density follows the window

For a window `w`, a query at position `i` keeps `min(w, i + 1)` keys, so the density over the causally
visible pairs is about `w / (S/2)` until the window covers everything. Block smoothing changes the
count but, more importantly, turns kept keys into skipped tiles. (A window below half a block keeps
no block at all: choose the window at least as large as the block.)
'''),
    code('''windows = [16, 32, 64, 128, 256, 512, 1024]
rows = []
for w_ in windows:
    a = dm.topk_mask(bias, w_, causal=True)
    b = dm.topk_mask(bias, w_, causal=True, block=128)
    c = dm.topk_mask(bias_doge, w_, causal=True, block=128)
    rows.append([mask_density(x, S, S) for x in (a, b, c)] +
                [skipped_tile_fraction(x, TILE, TILE) for x in (a, b, c)])
rows = np.array(rows)
expected = [sum(min(w_, i + 1) for i in range(S)) / (S * (S + 1) / 2) for w_ in windows]

fig, ax = plt.subplots(1, 2, figsize=(11, 4))
ax[0].plot(windows, expected, "k:", label="min(w, i+1) per row")
for col, lab in zip(range(3), ["top-k, random bias", "+ 128-key blocks", "Doge-style bias + blocks"]):
    ax[0].plot(windows, rows[:, col], "o-", label=lab)
    ax[1].plot(windows, 100 * rows[:, 3 + col], "o-", label=lab)
for a_ in ax:
    a_.set_xscale("log", base=2); a_.set_xlabel("window w (keys kept per query row)"); a_.legend(fontsize=8)
ax[0].set_ylabel("mask density (fraction of causally visible pairs)")
ax[0].set_title(f"Density against window (S = {S})")
ax[1].set_ylabel(f"skipped {TILE}x{TILE} tiles (% of visible tiles)")
ax[1].set_title("What a tile-skipping kernel saves")
fig.tight_layout(); plt.show()'''),
    md('''
Top-k of an unstructured bias is sparse but skips few tiles until the window is tiny; block
smoothing and structured (Doge-style) biases turn the same budget into whole skipped tiles, and the
tiles they do compute into whole *kept* tiles: where every mask element of a warp's rows of a tile is
kept, the CUDA forward skips the per-element mask test, so such tiles cost what a bias alone costs
(H100, gqa8k forward, all-ones mask + bias, in one run: 1.80 against 1.89 ms before). The benchmark's `gqa8k_topk`
configuration uses exactly this construction (top-2048, then 128-key blocks) at 8K tokens.
'''),
]

# ---------------------------------------------------------------------------------------------
nb3 = [
    md('''
# 03 · Performance

The benchmark (`python -m benchmarks --suite all --backward`) times dmattn_cupy and its peers
(torch SDPA with the flash, cuDNN and memory-efficient backends, and FlexAttention) **in the same
run on the same GPU**, after checking every implementation against a float64 reference. Its JSON
results are committed under `benchmarks/results/`; this notebook loads and plots them. It never
plots numbers it does not have.
'''),
    code(SETUP + '''
import glob
from benchmarks import configs, report

files = sorted(glob.glob(str(root / "benchmarks" / "results" / "*.json")))
records = report.load(files) if files else []
print(f"{len(files)} result file(s):", *[pathlib.Path(f).name for f in files], sep="\\n  ")'''),
    md('''
## The configurations

All causal (bottom-right aligned), bf16, bias `randn` of shape `(B, Hk, Sq, Sk)`; masks built on the
GPU by `dm.topk_mask`. The sparsity sweep keeps a fixed-seed random choice of `round(d · n_vis)`
of the causally visible 128×128 blocks in each query-block row (always the diagonal block).
'''),
    code('''from IPython.display import Markdown, display
display(Markdown(configs.config_table()))'''),
    md('''
## Floors: what physics allows

Each dmattn_cupy record carries a **floor**: the time the GPU needs at least, from two ceilings
measured in the same run (device-to-device copy bandwidth, and the bf16 8192³ matmul rate):

$$ \\text{floor} = \\max\\left(\\frac{\\text{bytes}}{\\text{bandwidth}},\\ \\frac{\\text{FLOPs}}{\\text{matmul rate}}\\right) $$

- **bytes**: q, k, v read and out written, plus the causally visible half of the mask (1 byte)
  and of the bias (2 bytes) at the kept tiles only (a skipped tile's bias is never read);
  forward+backward adds dout, the gradients, a second read of bias and mask, and dbias written in
  full.
- **FLOPs**: `4·B·H·Sq·Sk·D` × the causally visible fraction × the mask density (the kernel only
  needs the kept pairs); backward costs 2.5× the forward.

`roofline_fraction = floor / measured`: 100% means at the physical limit. The model below uses
H100 ceilings measured alongside the peers (3.0 TB/s, 760 TFLOP/s) and the expected mask
densities — a model, not a measurement:
'''),
    code('''bw, rate = 3.0e12, 760e12
print(f"{'config':18s} {'pass':8s} {'GB moved':>9s} {'TFLOP':>7s} {'floor ms':>9s}  bound")
for c in configs.CONFIGS.values():
    if c.mask == "density" and c.density != 1.0:
        continue
    dens = c.expected_density()
    if dens is None:    # top-k smoothed to blocks depends on the bias: 0.124 measured on randn
        dens = 0.124
    for p in ("fwd", "fwd_bwd"):
        nbytes = c.bytes(p, density=dens)
        t_mem, t_math = nbytes / bw * 1e3, c.flops(p, dens) / rate * 1e3
        print(f"{c.name:18s} {p:8s} {nbytes / 1e9:9.3f} {c.flops(p, dens) / 1e12:7.3f} "
              f"{max(t_mem, t_math):9.3f}  {'memory' if t_mem > t_math else 'math'}")'''),
    md('''
## Measured results
'''),
    code('''if not records:
    print("No committed GPU results yet (benchmarks/results/*.json is empty).\\n"
          "Run `python -m benchmarks --suite all --backward` on a GPU to produce them;\\n"
          "nothing is plotted until then.")
else:
    report.finalize(records, None, None)   # ratios and sweep ratios (floors are already stored)
    display(Markdown(report.markdown(records)))'''),
    code('''if records:
    import tempfile
    from IPython.display import Image
    tmp = pathlib.Path(tempfile.mkdtemp())
    for png in report.make_plots(records, tmp, "results"):
        display(Image(filename=str(png)))'''),
    md('''
How to read them: a ratio above 1 means dmattn_cupy is faster than that peer on the same GPU.
`sdpa_flash` and `sdpa_cudnn` compute plain causal attention **without** the bias and mask — a
different, dense function, shown as the speed of plain attention. `sdpa_efficient`, `sdpa_cudnn_bias`
(forward only: cuDNN has no backward for a bias that needs a gradient) and `flex` compute the same
function as dmattn_cupy; `flex_build` includes building FlexAttention's BlockMask, which a
dynamic mask needs at every step. In the sparsity sweep, `time(d) / time(1)` close to `d` means the
kernel turns skipped tiles into saved time.
'''),
    md('''
## Decode: cost follows the kept keys

A decode step (a few query rows against a long cache) under a top-k mask keeps ~1% of the keys,
scattered, so nearly every 64-key tile still holds one: skipping tiles saves little there. Short
queries under a mask therefore run their own kernel (`kernels_cu/fwd_decode.cu`): each CTA scans
its key range of the mask, compacts the kept keys into a list, gathers only their K and V rows
(`cp.async`, a ring of two 64-key batches) and their bias, and the last CTA of each kv head to
finish merges the splits while they are still in L2 — one launch, no second pass. decode_128k
(1 query row, 2 heads, 131072 keys, top-1024) reads the 128 KB mask and ~0.3 MB of kept rows
instead of 33 MB of K and V:
'''),
    code('''for r in records:
    if r.get("config") == "decode_128k" and r.get("pass") == "fwd" and r.get("median_ms"):
        print(f"{r['impl']:16s} {r['median_ms'] * 1e3:8.1f} us")'''),
]

# ---------------------------------------------------------------------------------------------
nb4 = [
    md('''
# 04 · Training with a learnable dynamic mask

A single attention layer learns *which keys matter*. As in Doge's dynamic mask attention, the bias
is computed from the **value projections**: one score per key, `bias_j = v_j · w_b`, shared by every
query row. Each step keeps the `window` keys with the largest bias per row (`dm.topk_mask`, causal),
and attends only to them. The mask itself is not differentiable, but the bias is: `dm.backward`
returns `dbias`, which flows back into `w_b` and the value projection.

**Toy task.** A sequence of tokens; a few are *flagged*. The target at position `i` is the mean
content of the flagged tokens at positions `≤ i`. To solve it the layer must learn to give flagged
tokens a high bias, so that the top-k mask keeps them.

Everything runs on NumPy (float64) with the gradients by `dm.backward`; the same step function runs
on CuPy at the end when a GPU is there.
'''),
    code(SETUP),
    code('''B, S, DM, D, WINDOW, CONTENT = 32, 64, 16, 16, 8, 8

def make_batch(rng, xp=np):
    x = np.zeros((B, S, DM))
    x[..., :CONTENT] = rng.standard_normal((B, S, CONTENT))
    flags = rng.random((B, S)) < 0.1
    flags[:, 0] = True                               # every prefix has a flagged token
    x[..., CONTENT] = flags
    x[..., CONTENT + 1] = 1.0                        # a constant feature
    c = x[..., :CONTENT] * flags[..., None]
    y = np.cumsum(c, axis=1) / np.cumsum(flags, axis=1)[..., None]
    return xp.asarray(x), xp.asarray(y)

def init_params(rng, xp=np):
    p = {n: rng.standard_normal((DM, D)) / np.sqrt(DM) for n in ("wq", "wk", "wv")}
    p["wo"] = rng.standard_normal((D, CONTENT)) / np.sqrt(D)
    p["wb"] = np.zeros(D)
    return {n: xp.asarray(a) for n, a in p.items()}'''),
    md('''
## One training step, with the gradients written out

Shapes: `x (B, S, DM)`, one head: `q, k, v (B, S, 1, D)`, bias `(B, 1, 1, S)` (one score per key,
broadcast over the query rows). `dm.backward` returns `dbias` with the bias's own shape, summed over
the broadcast query dimension, so the chain rule back to `w_b` and `W_v` is two lines.
'''),
    code('''def xp_of(a):
    return __import__(type(a).__module__.split(".")[0])

def step(p, x, y, window=WINDOW, use_mask=True, cast=None):
    """Loss and gradients of one batch. cast: dtype the attention inputs use (CUDA: float16)."""
    xp = xp_of(x)
    q, k, v = (x @ p[n] for n in ("wq", "wk", "wv"))            # (B, S, D)
    bias = (v @ p["wb"])[:, None, None, :]                        # (B, 1, 1, S): bias_j = v_j . w_b
    mask = None
    if use_mask:
        full = xp.broadcast_to(bias, (B, 1, S, S))
        mask = dm.topk_mask(xp.ascontiguousarray(full), window, causal=True)
    args = [a[:, :, None, :] for a in (q, k, v)]                  # (B, S, 1, D)
    if cast is not None:
        args, bias_in = [a.astype(cast) for a in args], bias.astype(cast)
    else:
        bias_in = bias
    out, lse = dm.forward(*args, mask, bias_in, causal=True, return_lse=True)
    o = out[:, :, 0, :].astype(x.dtype)
    pred = o @ p["wo"]
    err = pred - y
    loss = float((err ** 2).mean())
    # backward: L = mean(err^2)
    dpred = 2 * err / err.size
    g = {"wo": xp.einsum("bsd,bsc->dc", o, dpred)}
    do = (dpred @ p["wo"].T)[:, :, None, :]
    loss_scale = 1.0
    if cast is not None:       # half precision: scale dout up so small gradients survive
        loss_scale = 4096.0
        do = (do * loss_scale).astype(cast)
    dq, dk, dv, dbias = dm.backward(do, *args, out, lse, mask, bias_in, causal=True)
    dq, dk, dv = (a[:, :, 0, :].astype(x.dtype) / loss_scale for a in (dq, dk, dv))
    dbias = dbias[:, 0, 0, :].astype(x.dtype) / loss_scale        # (B, S)
    dv = dv + dbias[..., None] * p["wb"]                          # bias_j = v_j . w_b
    g["wb"] = xp.einsum("bs,bsd->d", dbias, v)
    for n, d_ in (("wq", dq), ("wk", dk), ("wv", dv)):
        g[n] = xp.einsum("bsm,bsd->md", x, d_)
    return loss, g, mask

class Adam:
    def __init__(self, params, lr=1e-2, b1=0.9, b2=0.999):
        self.lr, self.b1, self.b2, self.t = lr, b1, b2, 0
        self.m = {n: 0 * a for n, a in params.items()}
        self.v = {n: 0 * a for n, a in params.items()}

    def update(self, params, grads):
        self.t += 1
        for n in params:
            self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * grads[n]
            self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * grads[n] ** 2
            mh = self.m[n] / (1 - self.b1 ** self.t)
            vh = self.v[n] / (1 - self.b2 ** self.t)
            params[n] = params[n] - self.lr * mh / ((vh ** 0.5) + 1e-8)'''),
    md('''
Before training, a check of the hand-written chain rule: the gradient of `w_b` against a finite
difference (with the mask held fixed, as the top-k selection is piecewise constant).
'''),
    code('''rng = np.random.default_rng(0)
params = init_params(rng)
params["wb"] = rng.standard_normal(D) * 0.1
x, y = make_batch(rng)
loss0, grads, mask0 = step(params, x, y)

def loss_fixed_mask(p):
    q, k, v = (x @ p[n] for n in ("wq", "wk", "wv"))
    bias = (v @ p["wb"])[:, None, None, :]
    out = dm.forward(q[:, :, None], k[:, :, None], v[:, :, None], mask0, bias, causal=True)
    return float(((out[:, :, 0] @ p["wo"] - y) ** 2).mean())

for name, idx in (("wb", (3,)), ("wv", (2, 5))):
    e = np.zeros_like(params[name]); e[idx] = 1e-6
    plus = dict(params, **{name: params[name] + e}); minus = dict(params, **{name: params[name] - e})
    fd = (loss_fixed_mask(plus) - loss_fixed_mask(minus)) / 2e-6
    print(f"d loss / d {name}{list(idx)}: analytic {float(grads[name][idx]):+.6e}, finite difference {fd:+.6e}")'''),
    md('''
## Train

Two runs from the same initialisation: the dynamic top-8 mask, and dense causal attention with the
same learnable bias (no mask) as a reference.
'''),
    code('''def train(use_mask, steps=250, seed=0):
    rng = np.random.default_rng(seed)
    p = init_params(rng)
    opt = Adam(p, lr=1e-2)
    losses, recall = [], []
    for t in range(steps):
        x, y = make_batch(rng)
        loss, g, mask = step(p, x, y, use_mask=use_mask)
        opt.update(p, g)
        losses.append(loss)
        if mask is not None:   # share of flagged visible keys the top-k mask keeps
            flags = np.asarray(x[..., CONTENT], dtype=bool)[:, None, None, :]
            vis = np.tril(np.ones((S, S), dtype=bool))
            recall.append((mask & flags).sum() / (flags & vis).sum())
    return p, np.array(losses), np.array(recall)

import time
t0 = time.time()
p_mask, loss_mask, recall = train(use_mask=True)
p_dense, loss_dense, _ = train(use_mask=False)
print(f"trained both in {time.time() - t0:.1f} s; final loss: top-{WINDOW} mask {loss_mask[-20:].mean():.4f}, "
      f"dense {loss_dense[-20:].mean():.4f}")'''),
    code('''fig, ax = plt.subplots(1, 2, figsize=(11, 4))
ax[0].plot(loss_mask, label=f"dynamic top-{WINDOW} mask")
ax[0].plot(loss_dense, label="dense causal + bias", alpha=0.8)
ax[0].set_yscale("log"); ax[0].set_xlabel("training step"); ax[0].set_ylabel("MSE loss")
ax[0].set_title("Loss (toy task: mean of flagged tokens so far)"); ax[0].legend()
ax[1].plot(100 * recall)
ax[1].set_xlabel("training step"); ax[1].set_ylabel("flagged keys kept by the mask (%)")
ax[1].set_ylim(0, 105)
ax[1].set_title(f"The learned bias steers top-{WINDOW} to the flagged keys")
fig.tight_layout(); plt.show()'''),
    md('''
Both runs learn the task. The top-8 run levels off above the dense one: a prefix with more than 8
flagged tokens cannot keep them all (a few percent of the flagged keys are dropped, right panel) —
the price of attending to at most 8 keys instead of up to 64. The learned bias: flagged tokens get a
high score, so the top-k mask keeps them.
'''),
    code('''rng = np.random.default_rng(123)
x, y = make_batch(rng)
score = (x @ p_mask["wv"]) @ p_mask["wb"]
flags = x[..., CONTENT].astype(bool)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.hist(score[~flags].ravel(), bins=40, alpha=0.7, label="other tokens")
ax.hist(score[flags].ravel(), bins=40, alpha=0.7, label="flagged tokens")
ax.set_xlabel("learned bias b_j = v_j . w_b"); ax.set_ylabel("number of tokens")
ax.set_title("Bias learned by the dynamic-mask layer"); ax.legend(); plt.tight_layout(); plt.show()'''),
    md('''
## The same step on a GPU

The step function is written against the array module of its inputs: moved to CuPy, with the
attention inputs cast to float16, it runs the CUDA kernels. On a machine without a GPU this cell
says so.
'''),
    code(GPU_PROBE),
    code('''if HAVE_GPU:
    import cupy as cp
    try:
        rng = np.random.default_rng(0)
        pg = {n: cp.asarray(a, dtype=cp.float32) for n, a in init_params(rng).items()}
        opt = Adam(pg, lr=1e-2)
        gpu_losses = []
        for t in range(100):
            x, y = make_batch(rng, xp=cp)
            loss, g, _ = step(pg, x.astype(cp.float32), y.astype(cp.float32), cast=cp.float16)
            opt.update(pg, g)
            gpu_losses.append(loss)
        print(f"GPU (fp16 attention): loss {np.mean(gpu_losses[:10]):.4f} -> {np.mean(gpu_losses[-10:]):.4f}")
    except Exception as exc:  # report, do not hide
        print("GPU training failed:", type(exc).__name__, exc)
else:
    print("No CUDA device here: GPU training skipped (the NumPy run above is the same code).")'''),
]


def build(name, cells):
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NB)}})
    client.execute()
    path = NB / name
    nbformat.write(nb, path)
    print("wrote", path)


if __name__ == "__main__":
    want = sys.argv[1:] or ["1", "2", "3", "4"]
    table = {"1": ("01_quickstart.ipynb", nb1), "2": ("02_dynamic_masks.ipynb", nb2),
             "3": ("03_performance.ipynb", nb3), "4": ("04_training.ipynb", nb4)}
    for w in want:
        build(*table[w])
