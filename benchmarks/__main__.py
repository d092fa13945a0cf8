"""``python -m benchmarks``: time dmattn_cupy and its peers in one run on one GPU.

    python -m benchmarks --suite seed|gqa|decode|sparsity|all [--backward] [--peers sdpa,flex]
                         [--out DIR] [--quick] [--small] [--no-check] [--only NAME,...]

For every config of the suite: (1) a correctness check of every implementation on a small size
of the config against a float64 reference (relative errors printed; a peer that computes a
different function is flagged; FlexAttention runs eagerly there with the same score_mod and
mask_mod, so the timed compile happens once per config; rows the mask hides entirely are
excluded from the forward error and counted -- dmattn_cupy defines them as 0), (2) the
full-size inputs, the mask built on the GPU by ``dmattn_cupy.topk_mask`` (its time recorded),
(3) per implementation and pass: one warm-up call, the working-set peak memory of one call, and
the median time of ``triton.testing.do_bench``.
Device ceilings (copy bandwidth, bf16 matmul rate) are measured in the same run and give each
dmattn_cupy record its ``floor_ms`` and ``roofline_fraction``.

Writes ``<suite>_<pass>_<gpu>.json`` (one per pass), ``<suite>_<gpu>.md`` and up to three PNGs to
``benchmarks/results`` (or ``--out``); prints the markdown table last.

``--quick`` shortens the timing (warmup 10 ms, rep 30 ms); ``--small`` runs every config at its
check size (a smoke test of the whole pipeline); ``--no-check`` skips step 1; ``--device cpu`` is
the harness self-test of tests/test_benchmarks_cpu.py (NumPy path, SDPA math, eager flex).
The commit recorded is $DMATTN_COMMIT, else ``git rev-parse HEAD``, else "unknown".
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import subprocess
import signal
import sys
import time
import warnings
from pathlib import Path

from . import report
from .report import gpu_short_name
from .configs import Config, suite_configs
from .peers import OURS, OURS_MAP, applies, select_peers

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FWD_TOL = 2e-2  # bf16 inputs, float32 accumulation: relative Frobenius error well below this
GRAD_TOL = 5e-2


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="seed", choices=["seed", "gqa", "decode", "sparsity", "all"])
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--peers", default="sdpa,flex",
                   help="comma list: sdpa, flex, or exact names (sdpa_flash, sdpa_cudnn, "
                        "sdpa_cudnn_bias, sdpa_efficient, flex, flex_build); 'none' for "
                        "dmattn_cupy alone")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (warmup 10, rep 30 ms)")
    p.add_argument("--small", action="store_true", help="every config at its small check size")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--only", default="",
                   help="comma list of config names to run instead of the whole suite "
                        "(files keep the suite's name)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: harness self-test only (NumPy path, SDPA math, eager flex)")
    return p.parse_args(argv)


def git_commit() -> str:
    # $DMATTN_COMMIT first: a copied working tree (the GPU machine's) may carry a stale .git.
    if os.environ.get("DMATTN_COMMIT"):
        return os.environ["DMATTN_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    kind = type(exc).__name__
    if "out of memory" in str(exc).lower() or "OutOfMemory" in kind:
        kind = "out of memory"
    return f"{kind}: {first[:240]}"


class Progress:
    """tqdm when importable, else a printed counter (both on stderr)."""

    def __init__(self, total: int):
        self.total, self.n = total, 0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def step(self, label: str):
        self.n += 1
        if self.bar is not None:
            self.bar.set_description(label[:60])
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---- correctness -----------------------------------------------------------------------------
def empty_rows(inp):
    """Bool (B, Sq, H): query rows whose mask & causal hide every key (None when there are none)."""
    from .peers import causal_keep_torch
    cfg = inp.cfg
    if inp.mask is None:
        return None
    keep = inp.mask
    if cfg.causal:
        keep = keep & causal_keep_torch(cfg.seqlen_q, cfg.seqlen_k, keep.device)
    rows = keep.any(-1).repeat_interleave(cfg.group, 1)  # (B, H, Sq)
    rows = ~rows.transpose(1, 2)
    return rows if bool(rows.any()) else None


def _rows(x, empty):
    """x (B, Sq, H, D) without the fully masked rows (flattened), or x itself."""
    return x if empty is None else x[~empty]


def check_config(cfg: Config, names: list[str], passes: list[str]) -> dict:
    """Run every impl on a small size of cfg against float64; returns {impl: {field: value}}."""
    import torch

    from . import peers
    from .peers import as_torch, make_impl, make_inputs, reference, rel_err, synchronize
    from .timing import free_memory
    small = cfg.small()
    want_grad = "fwd_bwd" in passes
    inp = make_inputs(small, seed=1)
    ref_full = reference(inp, plain=False, grads=want_grad)
    differs = small.has_bias or small.has_mask
    ref_plain = reference(inp, plain=True, grads=want_grad) if differs else ref_full
    if not want_grad:
        ref_full, ref_plain = (ref_full, None), (ref_plain, None)
    results = {}
    # FlexAttention runs eagerly here (same score_mod / mask_mod, no second compile per config)
    peers.SETTINGS["flex_eager"] = True
    for name in (n for n in names if applies(n, cfg)):
        res: dict = {}
        try:
            impl = make_impl(name, inp)
            own = ref_plain if impl.computes == "plain" else ref_full
            with impl.ctx():
                out = as_torch(impl.fwd())
            synchronize()
            # rows where the config hides every key: defined as 0 here; a peer may give NaN
            empty = empty_rows(inp) if impl.computes == "full" else None
            res["check_rel_err"] = rel_err(_rows(out, empty), _rows(own[0], empty))
            res["check_rel_err_vs_config"] = rel_err(_rows(out, empty), _rows(ref_full[0], empty))
            if empty is not None and bool(empty.any()):
                bad = ~torch.isfinite(out[empty]).all(-1) | (out[empty] != 0).any(-1)
                res["check_empty_rows"] = int(empty.sum())
                res["check_empty_rows_not_zero"] = int(bad.sum())
            res["computes"] = ("causal only, no bias, no mask" if impl.computes == "plain"
                               else "bias, mask and causal")
            ok = res["check_rel_err"] < FWD_TOL
            res["check_fwd_ok"] = bool(ok)  # the forward row's verdict, whatever the backward does
            res["same_function"] = bool(res["check_rel_err_vs_config"] < FWD_TOL)
            if want_grad:
                try:
                    with impl.ctx():
                        grads = [as_torch(g) for g in impl.fwd_bwd()]
                    synchronize()
                    errs = [rel_err(g, r) for g, r in zip(grads[:3], own[1][:3])]
                    if impl.has_bias_grad and own[1][3] is not None and grads[3] is not None:
                        errs.append(rel_err(grads[3], own[1][3]))
                    res["check_grad_rel_err"] = max(errs)
                    ok = ok and res["check_grad_rel_err"] < GRAD_TOL
                except Exception as exc:
                    res["check_grad_error"] = short_error(exc)
                    ok = False
            res["check_ok"] = bool(ok)
            del impl
        except Exception as exc:  # a failing impl is reported, the run goes on
            res["check_error"] = short_error(exc)
            res["check_ok"] = False
        results[name] = res
        line = f"[check] {small.name:24s} {name:15s} "
        if "check_error" in res:
            line += f"ERROR {res['check_error']}"
        else:
            line += f"fwd rel err {res['check_rel_err']:.2e}"
            if "check_grad_rel_err" in res:
                line += f"  grad rel err {res['check_grad_rel_err']:.2e}"
            if "check_grad_error" in res:
                line += f"  grad ERROR {res['check_grad_error']}"
            line += "  OK" if res["check_ok"] else "  FAIL"
            if res.get("check_empty_rows_not_zero"):
                line += (f"  [{res['check_empty_rows_not_zero']} of {res['check_empty_rows']} "
                         "fully masked rows not 0 (NaN?): excluded from the error]")
            if differs and not res["same_function"]:
                line += (f"  [computes a different function: {res['computes']}; "
                         f"rel err vs the config's function {res['check_rel_err_vs_config']:.2e}]")
        print(line, flush=True)
        free_memory()
    peers.SETTINGS["flex_eager"] = False
    del inp
    free_memory()
    return results


# ---- timing ------------------------------------------------------------------------------------
def bench_config(cfg: Config, names, passes, base: dict, timing: dict, progress: Progress,
                 checks: dict) -> list[dict]:
    from .peers import make_flex, make_impl, make_inputs, make_ours, synchronize
    from .timing import cupy_allocations_from_torch, few_ms, free_memory, median_ms, peak_mem_gib

    def record(impl: str, pass_: str, **kw) -> dict:
        r = dict(base, config=cfg.name, impl=impl, **{"pass": pass_})
        r.update(batch=cfg.batch, heads=cfg.heads, kv_heads=cfg.kv_heads, seqlen_q=cfg.seqlen_q,
                 seqlen_k=cfg.seqlen_k, head_dim=cfg.head_dim, mask=cfg.mask,
                 has_bias=cfg.has_bias, density_target=cfg.density)
        r.update(kw)
        return r

    out: list[dict] = []
    err = None
    try:
        inp = make_inputs(cfg, seed=0, time_mask=True)
    except Exception as exc:  # free memory only once the traceback (and its frames) is gone
        err = short_error(exc)
    if err is not None:
        print(f"[bench] {cfg.name}: inputs/mask failed: {err}", flush=True)
        for name in names:
            for p in passes:
                progress.step(f"{cfg.name} {name} {p}")
                out.append(record(name, p, median_ms=None, peak_mem_gib=None, error=err))
        free_memory()
        return out
    density = inp.density
    if inp.mask_ms is not None:
        out.append(record("topk_mask", "mask", median_ms=inp.mask_ms, mask_density=density))

    for name in (n for n in names if applies(n, cfg)):
        impl, build, err = None, None, None
        try:
            if name == "flex":
                impl, build = make_flex(inp, build=False)
            elif name == OURS_MAP:
                impl, build = make_ours(inp, with_map=True)
            else:
                impl = make_impl(name, inp)
        except Exception as exc:
            err = short_error(exc)
        if err is not None:
            for p in passes:
                progress.step(f"{cfg.name} {name} {p}")
                rec = record(name, p, median_ms=None, peak_mem_gib=None, error=err)
                rec.update(checks.get(name, {}))
                out.append(rec)
            free_memory()
            continue
        if build is not None and cfg.has_mask:
            builder = "dmattn_block_map" if name == OURS_MAP else "flex_create_block_mask"
            try:
                ms = few_ms(build, n=5)
                out.append(record(builder, "mask", median_ms=ms, mask_density=density))
            except Exception as exc:
                out.append(record(builder, "mask", median_ms=None, error=short_error(exc)))
            free_memory()
        for p in passes:
            progress.step(f"{cfg.name} {name} {p}")
            fn = impl.fwd if p == "fwd" else impl.fwd_bwd
            rec = record(name, p, mask_density=density if cfg.has_mask else 1.0,
                         notes=impl.notes)
            rec.update(checks.get(name, {}))
            rec["computes"] = impl.computes
            try:
                with impl.ctx():
                    fn()  # warm-up: compilation, autotuning, handles
                    synchronize()
                    with cupy_allocations_from_torch():
                        rec["peak_mem_gib"] = peak_mem_gib(fn, impl.input_bytes)
                    rec["median_ms"] = median_ms(fn, **timing)
            except Exception as exc:
                rec.update(median_ms=None, peak_mem_gib=None, error=short_error(exc))
                print(f"[bench] {cfg.name} {name} {p}: {rec['error']}", file=sys.stderr)
            if rec.get("error"):
                free_memory()
            out.append(rec)
        del impl, build
        free_memory()
    del inp
    free_memory()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    from . import peers
    from . import timing as T
    peers.SETTINGS["device"] = args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks needs a CUDA GPU (torch.cuda.is_available() is False).")
        return 2

    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [OURS, OURS_MAP] + select_peers(args.peers)
    passes = ["fwd"] + (["fwd_bwd"] if args.backward else [])
    configs = suite_configs(args.suite)
    if args.only:
        from .configs import CONFIGS
        unknown = [n for n in args.only.split(",") if n not in CONFIGS]
        if unknown:
            print(f"unknown config(s) {unknown}; known: {sorted(CONFIGS)}")
            return 2
        configs = [CONFIGS[n] for n in args.only.split(",")]
    if args.small:
        configs = [c.small() for c in configs]
    timing = dict(warmup=10, rep=30) if args.quick else dict(warmup=25, rep=100)

    t0 = time.time()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (harness self-test)"
    short = gpu_short_name(gpu)
    versions = {"torch": torch.__version__}
    for mod in ("cupy", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    base = dict(gpu=gpu, commit=git_commit(),
                date=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                suite=args.suite, quick=bool(args.quick), **versions)
    ceil = T.ceilings(quick=args.quick or args.small)
    print(f"[ceilings] {gpu}: copy {ceil['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write), "
          f"bf16 8192^3 matmul {ceil['matmul_flops'] / 1e12:.0f} TFLOP/s", flush=True)

    records: list[dict] = []
    progress = Progress(len(configs) * len(names) * len(passes))
    checked: dict = {}
    # A run stopped from outside (SIGTERM, e.g. `timeout`) still writes the configs it finished.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for cfg in configs:
            checks: dict = {}
            if not args.no_check:
                key = (cfg.small().bias_shape, cfg.small().q_shape, cfg.mask, cfg.density, cfg.window)
                if key not in checked:
                    checked[key] = check_config(cfg, names, passes)
                checks = checked[key]
            tc = time.time()
            records += bench_config(cfg, names, passes, base, timing, progress, checks)
            print(f"[bench] {cfg.name} done in {time.time() - tc:.1f} s "
                  f"(total {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"[stopped] after {time.time() - t0:.0f} s: writing the configs finished so far",
              file=sys.stderr, flush=True)
    progress.close()

    for p in passes:
        records.append(dict(base, config="-", impl="device_ceilings", **{"pass": p},
                            median_ms=None, copy_bandwidth_TBps=ceil["copy_bandwidth_Bps"] / 1e12,
                            matmul_tflops=ceil["matmul_flops"] / 1e12))
    report.finalize(records, ceil["copy_bandwidth_Bps"], ceil["matmul_flops"])
    files = report.write_all(records, out_dir, args.suite, short)
    print(f"[done] {len(records)} records in {time.time() - t0:.0f} s", file=sys.stderr)
    for f in files:
        print(f"[wrote] {f}")
    print()
    print(report.markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
