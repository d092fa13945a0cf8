"""Equivalence runs: the CUDA path against the float64 NumPy reference on many random problems.

    python -m benchmarks.equivalence [--n 40] [--seed 0] [--cpu] [--backward]

For each random configuration (batch, lengths with Sq != Sk and lengths that are not tile
multiples, GQA, head dims 32..256, causal or not, softcap, masks none / random / top-k, bias
shapes with every allowed broadcast) the inputs are drawn in float64, rounded to the fast path's
dtype (fp16 or bf16 on the GPU), and both paths see the same rounded values:

- :func:`forward_equivalence`   out and lse of ``forward`` vs the float64 reference;
- :func:`backward_equivalence`  dq, dk, dv, dbias of ``backward`` vs the float64 reference;
- :func:`grad_equivalence`      the same gradients vs torch float64 autograd (an independent
                                derivation of the gradients; skipped without torch).

``--cpu`` (or no GPU) runs the NumPy float32 path as the "fast" one: a self-test of this harness.
Prints one line per case and a max / relative error summary; exits 1 if any case fails.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

TOL = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-5}


@dataclass
class Case:
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    softcap: float
    mask: str  # none | random | topk
    bias: str  # none | full | kv | shared | row
    dtype: str

    def shape_of(self, kind: str):
        b, h, hk, sq, sk = self.batch, self.heads, self.kv_heads, self.seqlen_q, self.seqlen_k
        return {"full": (b, hk, sq, sk), "heads": (b, h, sq, sk),
                "shared": (1, 1, sq, sk), "row": (b, 1, 1, sk)}[kind]

    def label(self) -> str:
        return (f"B{self.batch} Sq{self.seqlen_q} Sk{self.seqlen_k} H{self.heads}/{self.kv_heads} "
                f"D{self.head_dim} {'causal' if self.causal else 'full'} sc{self.softcap:g} "
                f"mask={self.mask} bias={self.bias} {self.dtype}")


def random_cases(n: int, seed: int = 0, dtypes=("float16", "bfloat16")) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        hk = int(rng.choice([1, 2, 4]))
        h = hk * int(rng.choice([1, 2, 4]))
        sq = int(rng.choice([1, 17, 64, 128, 200, 256, 333]))
        sk = int(rng.choice([sq, sq, 64, 129, 256, 400])) if sq > 1 else int(rng.choice([64, 515]))
        cases.append(Case(
            batch=int(rng.choice([1, 2])), seqlen_q=sq, seqlen_k=max(sk, 1), heads=h,
            kv_heads=hk, head_dim=int(rng.choice([32, 64, 64, 128, 128, 256])),
            causal=bool(rng.random() < 0.6), softcap=float(rng.choice([0.0, 0.0, 0.0, 30.0])),
            mask=str(rng.choice(["none", "random", "topk"])),
            bias=str(rng.choice(["none", "full", "heads", "shared", "row"])),
            dtype=dtypes[i % len(dtypes)]))
    return cases


def make_inputs(case: Case, seed: int):
    """float64 NumPy inputs, already rounded to the case's dtype."""
    import dmattn_cupy as dm
    rng = np.random.default_rng(seed)

    def rnd(shape, scale=1.0):
        return round_to(rng.standard_normal(shape) * scale, case.dtype)

    q = rnd((case.batch, case.seqlen_q, case.heads, case.head_dim))
    k = rnd((case.batch, case.seqlen_k, case.kv_heads, case.head_dim))
    v = rnd((case.batch, case.seqlen_k, case.kv_heads, case.head_dim))
    dout = rnd(q.shape)
    bias = None if case.bias == "none" else rnd(case.shape_of(case.bias))
    mask = None
    if case.mask == "random":
        mshape = case.shape_of("full") if case.bias in ("none", "row") else bias.shape
        mask = rng.random(mshape) < 0.7
    elif case.mask == "topk":
        src = bias if bias is not None else rnd(case.shape_of("full"))
        mask = dm.topk_mask(src, max(1, case.seqlen_k // 3), causal=case.causal)
    return dict(q=q, k=k, v=v, dout=dout, bias=bias, mask=mask)


def round_to(x, dtype: str):
    """float64 values rounded to float16 / bfloat16 (nearest even), returned as float64."""
    if dtype == "bfloat16":
        u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.astype(np.uint32).view(np.float32).astype(np.float64)
    return np.asarray(x).astype(dtype).astype(np.float64)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class Fast:
    """The path under test: CuPy (GPU) or the NumPy float32 path (--cpu)."""

    def __init__(self, cpu: bool):
        self.cpu = cpu
        if not cpu:
            import cupy
            self.cp = cupy

    def put(self, x, dtype: str):
        if x is None:
            return None
        if self.cpu:
            return x if x.dtype == bool else x.astype(np.float32)
        if x.dtype == bool:
            return self.cp.asarray(x)
        a = x.astype(_np_dtype(dtype))
        try:
            return self.cp.asarray(a)
        except Exception:  # a CuPy without bfloat16 transfers: move the bits
            return self.cp.asarray(a.view(np.uint16)).view(a.dtype)

    def get(self, x):
        if x is None:
            return None
        if not self.cpu:
            try:
                x = self.cp.asnumpy(x)
            except Exception:
                x = self.cp.asnumpy(x.view(self.cp.uint16)).view(_np_dtype("bfloat16"))
        return np.asarray(x).astype(np.float64)

    def dtype(self, case: Case) -> str:
        return "float32" if self.cpu else case.dtype


def _errs(x, ref):
    if x is None or ref is None:
        return 0.0, 0.0
    fin = np.isfinite(ref)
    if not np.array_equal(np.isfinite(x), fin):
        return float("inf"), float("inf")
    d = np.abs(np.where(fin, x - ref, 0.0))
    den = np.linalg.norm(np.where(fin, ref, 0.0))
    return float(d.max(initial=0.0)), float(np.linalg.norm(d) / max(den, 1e-30))


def forward_equivalence(cases, fast: Fast, seed: int = 0) -> list[dict]:
    import dmattn_cupy as dm
    rows = []
    for i, c in enumerate(cases):
        x = make_inputs(c, seed + i)
        kw = dict(causal=c.causal, softcap=c.softcap, return_lse=True)
        ro, rl = dm.forward(x["q"], x["k"], x["v"], x["mask"], x["bias"], **kw)
        dt = fast.dtype(c)
        fo, fl = dm.forward(*(fast.put(x[n], dt) for n in ("q", "k", "v")),
                            fast.put(x["mask"], dt), fast.put(x["bias"], dt), **kw)
        eo, el = _errs(fast.get(fo), ro), _errs(fast.get(fl), rl)
        rows.append(dict(kind="forward", case=c.label(), dtype=dt, max_abs=max(eo[0], el[0]),
                         rel=max(eo[1], el[1]), ok=max(eo[1], el[1]) < TOL[dt]))
    return rows


def backward_equivalence(cases, fast: Fast, seed: int = 0) -> list[dict]:
    import dmattn_cupy as dm
    rows = []
    for i, c in enumerate(cases):
        x = make_inputs(c, seed + i)
        kw = dict(causal=c.causal, softcap=c.softcap)
        ro, rl = dm.forward(x["q"], x["k"], x["v"], x["mask"], x["bias"], return_lse=True, **kw)
        ref = dm.backward(x["dout"], x["q"], x["k"], x["v"], ro, rl, x["mask"], x["bias"], **kw)
        dt = fast.dtype(c)
        args = [fast.put(x[n], dt) for n in ("q", "k", "v")]
        m, b = fast.put(x["mask"], dt), fast.put(x["bias"], dt)
        fo, fl = dm.forward(*args, m, b, return_lse=True, **kw)
        got = dm.backward(fast.put(x["dout"], dt), *args, fo, fl, m, b, **kw)
        errs = [_errs(fast.get(g), r) for g, r in zip(got, ref)]
        rel = max(e[1] for e in errs)
        rows.append(dict(kind="backward", case=c.label(), dtype=dt,
                         max_abs=max(e[0] for e in errs), rel=rel, ok=rel < 2.5 * TOL[dt]))
    return rows


def torch_reference_grads(x, c: Case):
    """dq, dk, dv, dbias by torch float64 autograd of the attention formula."""
    import torch
    t = {n: (torch.from_numpy(x[n]).requires_grad_(True) if x[n] is not None else None)
         for n in ("q", "k", "v", "bias")}
    g = c.heads // c.kv_heads
    q = t["q"].transpose(1, 2)
    k = t["k"].transpose(1, 2).repeat_interleave(g, 1)
    v = t["v"].transpose(1, 2).repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * c.head_dim ** -0.5
    if t["bias"] is not None:
        b = t["bias"]
        if b.shape[1] not in (1, c.heads):
            b = b.repeat_interleave(g, 1)
        s = s + b
    if c.softcap > 0:
        s = c.softcap * torch.tanh(s / c.softcap)
    keep = torch.ones(s.shape, dtype=torch.bool)
    if c.causal:
        i = torch.arange(c.seqlen_q)[:, None]
        j = torch.arange(c.seqlen_k)[None, :]
        keep = keep & (j <= i + c.seqlen_k - c.seqlen_q)
    if x["mask"] is not None:
        m = torch.from_numpy(np.asarray(x["mask"], dtype=bool))
        if m.shape[1] not in (1, c.heads):
            m = m.repeat_interleave(g, 1)
        keep = keep & m
    s = s.masked_fill(~keep, float("-inf"))
    rows = keep.any(-1, keepdim=True)
    p = torch.softmax(torch.where(rows, s, torch.zeros_like(s)), -1) * keep
    out = (p @ v).transpose(1, 2)
    ins = [t[n] for n in ("q", "k", "v", "bias") if t[n] is not None]
    grads = torch.autograd.grad(out, ins, torch.from_numpy(x["dout"]))
    grads = [gr.numpy() for gr in grads] + ([None] if t["bias"] is None else [])
    return grads


def grad_equivalence(cases, fast: Fast, seed: int = 0) -> list[dict]:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("[grad_equivalence] torch not installed: skipped")
        return []
    import dmattn_cupy as dm
    rows = []
    for i, c in enumerate(cases):
        x = make_inputs(c, seed + i)
        kw = dict(causal=c.causal, softcap=c.softcap)
        ref = torch_reference_grads(x, c)
        dt = fast.dtype(c)
        args = [fast.put(x[n], dt) for n in ("q", "k", "v")]
        m, b = fast.put(x["mask"], dt), fast.put(x["bias"], dt)
        fo, fl = dm.forward(*args, m, b, return_lse=True, **kw)
        got = dm.backward(fast.put(x["dout"], dt), *args, fo, fl, m, b, **kw)
        errs = [_errs(fast.get(gr), r) for gr, r in zip(got, ref)]
        rel = max(e[1] for e in errs)
        rows.append(dict(kind="grad", case=c.label(), dtype=dt, max_abs=max(e[0] for e in errs),
                         rel=rel, ok=rel < 2.5 * TOL[dt]))
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["| run | dtype | cases | failed | max abs err | max rel err |",
             "|---|---|---|---|---|---|"]
    for kind in ("forward", "backward", "grad"):
        for dt in sorted({r["dtype"] for r in rows}):
            sel = [r for r in rows if r["kind"] == kind and r["dtype"] == dt]
            if sel:
                lines.append(f"| {kind} | {dt} | {len(sel)} | {sum(not r['ok'] for r in sel)} | "
                             f"{max(r['max_abs'] for r in sel):.2e} | "
                             f"{max(r['rel'] for r in sel):.2e} |")
    return "\n".join(lines)


def _gpu_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.equivalence", description=__doc__)
    ap.add_argument("--n", type=int, default=40, help="random cases per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="NumPy float32 path as the fast one")
    ap.add_argument("--backward", action="store_true", default=True)
    ap.add_argument("--forward-only", dest="backward", action="store_false")
    args = ap.parse_args(argv)
    cpu = args.cpu or not _gpu_available()
    if cpu and not args.cpu:
        print("[equivalence] no CUDA device: running the NumPy float32 path (harness self-test)")
    fast = Fast(cpu)
    cases = random_cases(args.n, args.seed)
    rows = forward_equivalence(cases, fast, args.seed)
    if args.backward:
        rows += backward_equivalence(cases, fast, args.seed)
        rows += grad_equivalence(cases, fast, args.seed)
    for r in rows:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['kind']:8s} rel {r['rel']:.2e} "
              f"abs {r['max_abs']:.2e}  {r['case']}")
    print()
    print(summary(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
