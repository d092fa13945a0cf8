"""Benchmark records -> ratios and floors, JSON files, a markdown table and PNG plots.

No GPU needed: ``python -m benchmarks.report benchmarks/results/*.json [--out DIR]`` regenerates
the markdown and the plots from committed JSON.

Record schema (one dict per (config, impl, pass); JSON files hold a list of them):

==================  ======================================================================
config, impl, pass  names; pass is "fwd", "fwd_bwd", or "mask" (mask-construction cost)
median_ms           median milliseconds, or None with ``error`` set (OOM, unsupported, ...)
peak_mem_gib        inputs read + peak allocation of one call above the level before it
gpu, commit, date   torch.cuda.get_device_name(), git commit (or DMATTN_COMMIT), UTC ISO
ratio_vs_<peer>     on dmattn_cupy(_map) records: peer median / our median (>1: ours faster)
floor_ms            on dmattn_cupy(_map) records: max(bytes / copy bandwidth, FLOPs / matmul rate)
roofline_fraction   floor_ms / median_ms (1.0 = at the physical floor)
time_vs_dense       sparsity sweep: median at this density / median at density 1 (same impl)
check_*             correctness check on a small size against float64 (see __main__)
==================  ======================================================================

The markdown also lists the project's targets (``TARGETS``, ``BWD_TARGETS``) with the measured
ratio and whether each is met, for dmattn_cupy and, where it ran, for dmattn_cupy_map (the mask's
BlockMap made once outside the timed calls, as FlexAttention's BlockMask is).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import OrderedDict
from pathlib import Path

from .configs import Config
from .peers import OURS, OURS_IMPLS, OURS_MAP, PEER_NAMES

# Forward targets of the project (issue 3; H100, bf16, medians of one run): dmattn_cupy's time at
# most `limit` x the peer's. The sparsity sweep's: time(d) / time(1) <= d + SWEEP_SLACK.
TARGETS = (
    ("seed_4k", "flex", 0.8),
    ("seed_16k", "flex", 0.5),
    ("seed_32k", "flex", 0.5),
    ("gqa8k_topk", "flex", 0.6),
    ("gqa8k_topk", "sdpa_cudnn", 0.5),
    ("gqa8k_dense", "sdpa_cudnn", 1.5),
    ("decode_128k", "sdpa_cudnn_bias", 0.5),
)
SWEEP_SLACK = 0.1
# Forward + backward targets (issue 4), the same way; the sweep's slack is BWD_SWEEP_SLACK.
BWD_TARGETS = (
    ("seed_16k", "flex", 0.4),
    ("seed_32k", "flex", 0.35),
    ("gqa8k_topk", "sdpa_cudnn", 1.0),
)
BWD_SWEEP_SLACK = 0.15
# pass -> (section title, targets, sweep slack)
TARGET_SETS = {"fwd": ("Forward targets (issue 3, H100)", TARGETS, SWEEP_SLACK),
               "fwd_bwd": ("Forward + backward targets (issue 4, H100)", BWD_TARGETS, BWD_SWEEP_SLACK)}
PASS_TITLES = {"fwd": "Forward", "fwd_bwd": "Forward + backward"}
REQUIRED_FIELDS = ("config", "impl", "pass", "median_ms", "peak_mem_gib", "gpu", "commit", "date")


# ---- derived fields -----------------------------------------------------------------------------
def config_of(rec: dict) -> Config:
    """Rebuild the Config of a record from its shape fields (floors need only those)."""
    return Config(rec["config"], int(rec["batch"]), int(rec["heads"]), int(rec["kv_heads"]),
                  int(rec["seqlen_q"]), int(rec["seqlen_k"]), int(rec["head_dim"]),
                  mask=rec.get("mask", "topk"), window=None, has_bias=bool(rec.get("has_bias")),
                  density=rec.get("density_target"))


def _ok(rec) -> bool:
    return rec.get("median_ms") is not None and not rec.get("error")


def finalize(records: list[dict], bandwidth: float | None, matmul_rate: float | None):
    """Add ratio_vs_<peer>, floor_ms, roofline_fraction (ours) and time_vs_dense (sweep)."""
    by_key = {(r["config"], r["impl"], r["pass"]): r for r in records}
    for r in records:
        if r["impl"] not in OURS_IMPLS or r["pass"] not in PASS_TITLES:
            continue
        if _ok(r):
            for peer in PEER_NAMES:
                p = by_key.get((r["config"], peer, r["pass"]))
                if p is not None and _ok(p):
                    r[f"ratio_vs_{peer}"] = p["median_ms"] / r["median_ms"]
        if bandwidth and matmul_rate and "batch" in r:
            cfg = config_of(r)
            dens = r.get("mask_density") or 1.0
            mask_read = dens if r["impl"] == OURS_MAP else 1.0  # given the map: kept tiles' rows
            r["floor_ms"] = cfg.floor_ms(r["pass"], bandwidth, matmul_rate, density=dens,
                                         mask_read=mask_read)
            r["floor_bytes"] = cfg.bytes(r["pass"], density=dens, mask_read=mask_read)
            r["floor_flops"] = cfg.flops(r["pass"], dens)
            if _ok(r):
                r["roofline_fraction"] = r["floor_ms"] / r["median_ms"]
    dense = {}
    for r in records:
        if r.get("mask") == "density" and r.get("density_target") == 1.0 and _ok(r):
            dense[(r["impl"], r["pass"])] = r["median_ms"]
    for r in records:
        if r.get("mask") == "density" and _ok(r) and (r["impl"], r["pass"]) in dense:
            r["time_vs_dense"] = r["median_ms"] / dense[(r["impl"], r["pass"])]
    return records


def gpu_short_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; falls back to a sanitized lower-case name."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name or "")
    if m:
        return m.group(1).lower()
    s = re.sub(r"[^a-z0-9]+", "-", (name or "gpu").lower()).strip("-")
    return s or "gpu"


# ---- files ---------------------------------------------------------------------------------------
def load(paths) -> list[dict]:
    records: list[dict] = []
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of records")
        records += data
    return records


def validate_record(rec: dict):
    """Raise ValueError when a timing record misses a required field."""
    if rec.get("impl") == "device_ceilings":
        return
    need = REQUIRED_FIELDS if rec.get("pass") in PASS_TITLES else (
        "config", "impl", "pass", "median_ms", "gpu", "commit", "date")
    missing = [k for k in need if k not in rec]
    if missing:
        raise ValueError(f"record {rec.get('config')}/{rec.get('impl')} misses {missing}")
    if rec["median_ms"] is None and not rec.get("error"):
        raise ValueError(f"record {rec['config']}/{rec['impl']}: no median_ms and no error")


def write_all(records: list[dict], out_dir, suite: str, short: str) -> list[Path]:
    """One JSON per pass (mask-cost records go with fwd), one markdown, up to three PNGs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    passes = [p for p in PASS_TITLES if any(r["pass"] == p for r in records)]
    for p in passes:
        sel = [r for r in records if r["pass"] == p or (p == "fwd" and r["pass"] == "mask")]
        for r in sel:
            validate_record(r)
        path = out_dir / f"{suite}_{p}_{short}.json"
        path.write_text(json.dumps(sel, indent=1, default=_jsonable) + "\n")
        files.append(path)
    md = out_dir / f"{suite}_{short}.md"
    md.write_text(markdown(records) + "\n")
    files.append(md)
    files += make_plots(records, out_dir, f"{suite}_{short}")
    return files


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


# ---- markdown ------------------------------------------------------------------------------------
def _fmt_ms(x) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _err_cell(rec) -> str:
    e = (rec.get("error") or "error").split(":")[0]
    return f"✗ {e}"


def _configs(records):
    return list(OrderedDict.fromkeys(r["config"] for r in records
                                     if r["pass"] in PASS_TITLES and r["config"] != "-"))


def _impls(records):
    present = {r["impl"] for r in records}
    return [i for i in OURS_IMPLS + PEER_NAMES if i in present]


def target_rows(records: list[dict], pass_: str = "fwd") -> list[tuple[str, str, str, bool | None]]:
    """(config, target, measured, met) for each target of `pass_` (TARGET_SETS) whose config ran;
    met is None when the peer has no time (not run, or failed)."""
    _, targets, slack = TARGET_SETS[pass_]
    by_key = {(r["config"], r["impl"], r["pass"]): r for r in records}
    rows = []
    for impl in OURS_IMPLS:
        label = "" if impl == OURS else " + BlockMap"
        for config, peer, limit in targets:
            ours = by_key.get((config, impl, pass_))
            if ours is None:
                continue
            other = by_key.get((config, peer, pass_))
            target = f"≤ {limit:g}× {peer}"
            if not _ok(ours):
                rows.append((config + label, target, _err_cell(ours), False))
            elif other is None or not _ok(other):
                rows.append((config + label, target, "— (no peer time)", None))
            else:
                value = ours["median_ms"] / other["median_ms"]
                rows.append((config + label, target, f"{value:.2f}× ({_fmt_ms(ours['median_ms'])} / "
                             f"{_fmt_ms(other['median_ms'])} ms)", value <= limit))
        for r in records:
            if r["impl"] == impl and r["pass"] == pass_ and r.get("time_vs_dense") is not None:
                limit = r["density_target"] + slack
                rows.append((r["config"] + label, f"time(d) / time(1) ≤ {limit:g}",
                             f"{r['time_vs_dense']:.2f}", r["time_vs_dense"] <= limit))
    return rows


def markdown(records: list[dict]) -> str:
    if not records:
        return "_no benchmark records_"
    by_key = {(r["config"], r["impl"], r["pass"]): r for r in records}
    any_rec = next((r for r in records if r.get("gpu")), {})
    lines = [f"## dmattn_cupy benchmark — {any_rec.get('gpu', '?')}", ""]
    # Records merged from several runs name each run: commit, date and its configs.
    runs: dict[tuple, list[str]] = {}
    for r in records:
        if r.get("config", "-") != "-":
            names = runs.setdefault((str(r.get("commit", "unknown"))[:12], r.get("date", "?")[:10]), [])
            if r["config"] not in names:
                names.append(r["config"])
    if len(runs) > 1:
        lines.append("Runs merged here (every peer re-measured in each): " + "; ".join(
            f"commit `{c}`, {d}: {', '.join(names)}" for (c, d), names in runs.items()) + ".")
        lines.append("")
    commit = str(any_rec.get("commit", "unknown"))[:12]
    lines.append(f"commit `{commit}`, {any_rec.get('date', '?')}, "
                 f"torch {any_rec.get('torch')}, cupy {any_rec.get('cupy')}, "
                 f"triton {any_rec.get('triton')}; medians of triton.testing.do_bench, bf16.")
    ceil = next((r for r in records if r["impl"] == "device_ceilings"), None)
    if ceil:
        lines.append(f"Ceilings measured in the same run: copy {ceil['copy_bandwidth_TBps']:.2f} "
                     f"TB/s (read + write), bf16 8192³ matmul {ceil['matmul_tflops']:.0f} TFLOP/s.")
    lines.append("")
    impls = _impls(records)
    configs = _configs(records)
    for p, title in PASS_TITLES.items():
        if not any(r["pass"] == p for r in records):
            continue
        lines += [f"### {title} (ms; in parentheses: peer time / dmattn_cupy time)", ""]
        head = ["config", "dmattn_cupy", "floor", "floor / time"] + [
            i + ("¹" if i in ("sdpa_flash", "sdpa_cudnn") else "") for i in impls if i != OURS]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for c in configs:
            ours = by_key.get((c, OURS, p))
            row = [c]
            if ours is None:
                row += ["—", "—", "—"]
            elif _ok(ours):
                row += [_fmt_ms(ours["median_ms"]), _fmt_ms(ours.get("floor_ms")),
                        f"{100 * ours['roofline_fraction']:.0f}%"
                        if ours.get("roofline_fraction") else "—"]
            else:
                row += [_err_cell(ours), _fmt_ms(ours.get("floor_ms")), "—"]
            for i in impls:
                if i == OURS:
                    continue
                r = by_key.get((c, i, p))
                if r is None:
                    row.append("—")
                elif not _ok(r):
                    row.append(_err_cell(r))
                else:
                    ratio = ours.get(f"ratio_vs_{i}") if ours else None
                    row.append(_fmt_ms(r["median_ms"]) + (f" ({ratio:.2f}x)" if ratio else ""))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if OURS_MAP in impls:
        lines += [f"{OURS_MAP}: dmattn_cupy given the mask's BlockMap, made once by "
                  "dmattn_cupy.block_map outside the timed calls (as flex's BlockMask is prebuilt; "
                  "its cost is under Mask construction).", ""]
    if any(i in impls for i in ("sdpa_flash", "sdpa_cudnn")):
        lines += ["¹ causal attention without bias and mask: a different, dense function, shown "
                  "as the speed of plain attention.", ""]
    for pass_, (title, _, _) in TARGET_SETS.items():
        rows = target_rows(records, pass_)
        if rows:
            lines += [f"### {title}", "", "| config | target | measured | met |", "|---|---|---|---|"]
            lines += [f"| {c} | {t} | {m} | {'—' if ok is None else '✓' if ok else '✗'} |"
                      for c, t, m, ok in rows]
            if any(c.endswith(" + BlockMap") for c, _, _, _ in rows):
                lines += ["", "Rows without \"+ BlockMap\" give the mask alone: every call finds the "
                          "tiles to skip by reading the whole mask, the work that flex's times leave to "
                          "its prebuilt BlockMask (flex_build pays it); \"+ BlockMap\" rows compare "
                          "prebuilt to prebuilt."]
            lines.append("")
    # peak memory
    mem_rows = []
    for p in PASS_TITLES:
        for c in configs:
            cells = []
            for i in impls:
                r = by_key.get((c, i, p))
                cells.append("—" if r is None or r.get("peak_mem_gib") is None
                             else f"{r['peak_mem_gib']:.2f}")
            if any(x != "—" for x in cells):
                mem_rows.append("| " + " | ".join([c, p] + cells) + " |")
    if mem_rows:
        head = ["config", "pass"] + impls
        lines += ["### Peak memory (GiB: inputs read + peak allocation during one call)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + mem_rows + [""]
    # mask construction
    mask_recs = [r for r in records if r["pass"] == "mask"]
    if mask_recs:
        lines += ["### Mask construction (ms)", "",
                  "| config | mask density | dmattn_cupy.topk_mask | dmattn_cupy.block_map | "
                  "flex create_block_mask |", "|---|---|---|---|---|"]
        for c in OrderedDict.fromkeys(r["config"] for r in mask_recs):
            t = by_key.get((c, "topk_mask", "mask"))
            b = by_key.get((c, "dmattn_block_map", "mask"))
            f = by_key.get((c, "flex_create_block_mask", "mask"))
            dens = next((r.get("mask_density") for r in mask_recs if r["config"] == c), None)

            def cell(r):
                return "—" if r is None else (_fmt_ms(r["median_ms"]) if _ok(r) else _err_cell(r))
            lines.append(f"| {c} | {'—' if dens is None else f'{dens:.3f}'} | {cell(t)} | {cell(b)} | "
                         f"{cell(f)} |")
        lines.append("")
    # sparsity
    sweep = [r for r in records if r.get("mask") == "density" and r["pass"] in PASS_TITLES]
    if sweep:
        lines += ["### Sparsity sweep (gqa8k, random 128x128 blocks): time(d) / time(1)", ""]
        head = ["density", "pass"] + [i for i in impls if any(r["impl"] == i for r in sweep)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in PASS_TITLES:
            for c in OrderedDict.fromkeys(r["config"] for r in sweep if r["pass"] == p):
                d = next(r["density_target"] for r in sweep if r["config"] == c)
                cells = []
                for i in head[2:]:
                    r = by_key.get((c, i, p))
                    if r is None or not _ok(r):
                        cells.append("—" if r is None else _err_cell(r))
                    else:
                        tv = r.get("time_vs_dense")
                        cells.append(_fmt_ms(r["median_ms"]) + (f" ({tv:.2f})" if tv else ""))
                lines.append("| " + " | ".join([f"{d:g}", p] + cells) + " |")
        lines.append("")
    # checks
    checked = [r for r in records if r["pass"] in PASS_TITLES and
               ("check_rel_err" in r or "check_error" in r)]
    if checked:
        lines += ["### Correctness check (small size of each config vs float64)", "",
                  "| config | impl | pass | fwd rel err | grad rel err | ok |",
                  "|---|---|---|---|---|---|"]
        for r in checked:
            fe = r.get("check_rel_err")
            ge = r.get("check_grad_rel_err")
            good = r.get("check_fwd_ok", r.get("check_ok")) if r["pass"] == "fwd" else r.get("check_ok")
            ok = "✓" if good else ("✗ " + (r.get("check_error") or r.get("check_grad_error", ""))[:60])
            if r.get("same_function") is False:
                ok += " (different function)"
            lines.append(f"| {r['config']} | {r['impl']} | {r['pass']} | "
                         f"{'—' if fe is None else f'{fe:.1e}'} | "
                         f"{'—' if ge is None else f'{ge:.1e}'} | {ok} |")
        lines.append("")
    return "\n".join(lines).rstrip()


# ---- plots ---------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_speedup(records, path):
    """Grouped bars: peer time / dmattn_cupy time per config (log scale), one panel per pass."""
    ours = [r for r in records if r["impl"] == OURS and r["pass"] in PASS_TITLES and _ok(r)
            and r.get("mask") != "density"]
    ours.sort(key=lambda r: (r["pass"], r.get("seqlen_k", 0), r["config"]))
    passes = [p for p in PASS_TITLES if any(r["pass"] == p for r in ours)]
    peers = [p for p in PEER_NAMES if any(f"ratio_vs_{p}" in r for r in ours)]
    if not passes or not peers:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(passes), figsize=(6.5 * len(passes), 4.5), squeeze=False)
    for ax, p in zip(axes[0], passes):
        rs = [r for r in ours if r["pass"] == p]
        width = 0.8 / len(peers)
        for j, peer in enumerate(peers):
            xs = [i + (j - (len(peers) - 1) / 2) * width for i in range(len(rs))]
            ys = [r.get(f"ratio_vs_{peer}", float("nan")) for r in rs]
            ax.bar(xs, ys, width, label=peer)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([f"{r['config']}\nSk={r['seqlen_k']}" for r in rs], fontsize=8)
        ax.set_ylabel("speedup of dmattn_cupy (peer ms / dmattn_cupy ms)")
        ax.set_title(f"{PASS_TITLES[p]}: speedup over peers ({rs[0].get('gpu', '')})", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_sparsity(records, path):
    """time(d) / time(1) against mask density d, per implementation and pass."""
    sweep = [r for r in records if r.get("mask") == "density" and r["pass"] in PASS_TITLES
             and _ok(r) and r.get("time_vs_dense") is not None]
    if not sweep:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dens = sorted({r["density_target"] for r in sweep})
    ax.plot(dens, dens, "k:", label="ideal (time ∝ density)")
    colors = {impl: f"C{i}" for i, impl in enumerate(_impls(sweep))}
    for p, style in (("fwd", "-o"), ("fwd_bwd", "--s")):
        for impl in _impls(sweep):
            rs = sorted((r for r in sweep if r["impl"] == impl and r["pass"] == p),
                        key=lambda r: r["density_target"])
            if rs:
                ax.plot([r["density_target"] for r in rs], [r["time_vs_dense"] for r in rs],
                        style, color=colors[impl], label=f"{impl} {p}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("mask density (fraction of causally visible 128x128 blocks kept)")
    ax.set_ylabel("time(d) / time(1)")
    ax.set_title("gqa8k: time against mask density (solid: forward, dashed: fwd + bwd)",
                 fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_memory(records, path):
    """Grouped bars of peak memory (GiB) per config and implementation, one panel per pass."""
    recs = [r for r in records if r["pass"] in PASS_TITLES and r.get("peak_mem_gib") is not None
            and r.get("mask") != "density"]
    if not recs:
        return None
    passes = [p for p in PASS_TITLES if any(r["pass"] == p for r in recs)]
    impls = _impls(recs)
    plt = _plt()
    fig, axes = plt.subplots(1, len(passes), figsize=(6.5 * len(passes), 4.5), squeeze=False)
    for ax, p in zip(axes[0], passes):
        configs = _configs([r for r in recs if r["pass"] == p])
        by = {(r["config"], r["impl"]): r["peak_mem_gib"] for r in recs if r["pass"] == p}
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(configs))]
            ax.bar(xs, [by.get((c, impl), float("nan")) for c in configs], width, label=impl)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, fontsize=8, rotation=20)
        ax.set_ylabel("peak memory (GiB)")
        ax.set_title(f"{PASS_TITLES[p]}: peak memory of one call", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def make_plots(records, out_dir, prefix: str) -> list[Path]:
    out_dir = Path(out_dir)
    made = [plot_speedup(records, out_dir / f"{prefix}_speedup.png"),
            plot_sparsity(records, out_dir / f"{prefix}_sparsity.png"),
            plot_memory(records, out_dir / f"{prefix}_memory.png")]
    return [m for m in made if m is not None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                 description="markdown + plots from benchmark JSON files")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default=None, help="folder for .md and .png (default: beside input)")
    args = ap.parse_args(argv)
    records = load(args.files)
    out = Path(args.out) if args.out else Path(args.files[0]).parent
    suite = next((r.get("suite") for r in records if r.get("suite")), "results")
    short = gpu_short_name(next((r.get("gpu") for r in records if r.get("gpu")), "gpu"))
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{suite}_{short}.md"
    md.write_text(markdown(records) + "\n")
    for f in [md] + make_plots(records, out, f"{suite}_{short}"):
        print(f"[wrote] {f}")
    print(markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
