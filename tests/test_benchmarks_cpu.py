"""CPU-testable parts of benchmarks/: configs, mask builders, floors, records, report, plots.

The GPU timing itself runs on a lent GPU; here the whole harness runs in its CPU self-test mode
(``--device cpu``: NumPy reference path, SDPA math backend, eager FlexAttention).
"""
import json

import numpy as np
import pytest

from benchmarks import configs as C
from benchmarks import report

ANCHOR_SHAPES = {  # /work/shared/anchors/h100.md: (B, H, Hk, Sq, Sk, D)
    "seed_4k": (1, 2, 1, 4096, 4096, 64),
    "seed_16k": (1, 2, 1, 16384, 16384, 64),
    "seed_32k": (1, 2, 1, 32768, 32768, 64),
    "gqa8k_topk": (2, 16, 4, 8192, 8192, 128),
    "gqa8k_dense": (2, 16, 4, 8192, 8192, 128),
    "decode_128k": (1, 2, 1, 1, 131072, 64),
}


def test_config_table_matches_anchor_configs():
    for name, shape in ANCHOR_SHAPES.items():
        c = C.CONFIGS[name]
        assert (c.batch, c.heads, c.kv_heads, c.seqlen_q, c.seqlen_k, c.head_dim) == shape
        assert c.causal
    assert C.CONFIGS["gqa8k_topk"].window == 2048 and C.CONFIGS["gqa8k_topk"].block == 128
    assert C.CONFIGS["seed_32k"].window == 1024 and C.CONFIGS["seed_32k"].mask == "topk"
    assert not C.CONFIGS["gqa8k_dense"].has_bias and not C.CONFIGS["gqa8k_dense"].has_mask
    assert C.CONFIGS["decode_128k"].bias_shape == (1, 1, 1, 131072)
    assert C.SUITES["all"] == [n for s in ("seed", "gqa", "decode", "sparsity")
                               for n in C.SUITES[s]]
    assert [C.CONFIGS[n].density for n in C.SUITES["sparsity"]] == list(C.SWEEP_DENSITIES)
    table = C.config_table()
    assert all(f"| {n} |" in table for n in C.CONFIGS)
    with pytest.raises(ValueError):
        C.suite_configs("nope")


def test_small_configs_keep_structure():
    for c in C.CONFIGS.values():
        s = c.small()
        assert s.heads % s.kv_heads == 0 and s.group == min(c.group, s.heads)
        assert s.mask == c.mask and s.has_bias == c.has_bias and s.head_dim == c.head_dim
        assert (s.seqlen_q == 1) == (c.seqlen_q == 1)
        assert s.small() == s


def test_visible_pairs_and_floors():
    assert C.visible_pairs(4, 4) == 10
    assert C.visible_pairs(1, 7) == 7
    assert C.visible_pairs(3, 2) == 0 + 1 + 2  # bottom-right: first row sees nothing
    assert C.visible_pairs(3, 5, causal=False) == 15
    c = C.CONFIGS["seed_32k"]
    # anchors: causal half of bf16 bias + 1-byte mask at 32k is about 1.5 GiB -> ~0.53 ms at 3 TB/s
    assert 1.45 < c.bytes("fwd") / 2**30 < 1.55
    assert 0.5 < c.floor_ms("fwd", 3.0e12, 760e12) < 0.56
    dense = C.CONFIGS["gqa8k_dense"]
    assert abs(dense.flops("fwd") / 1e12 - 0.55) < 0.01  # anchors: 0.55 TFLOP, math-bound
    assert dense.flops("fwd_bwd") == pytest.approx(3.5 * dense.flops("fwd"))
    assert dense.floor_ms("fwd", 3.0e12, 760e12) == pytest.approx(
        1e3 * dense.flops("fwd") / 760e12)
    assert c.bytes("fwd_bwd") > 2 * c.bytes("fwd")


@pytest.mark.parametrize("density", C.SWEEP_DENSITIES)
def test_density_block_keep_counts(density):
    sq = sk = 1024
    keep = C.density_block_keep(2, 3, sq, sk, density, block=128, seed=0)
    assert keep.shape == (2, 3, 8, 8)
    for r in range(8):
        n_vis = r + 1
        row = keep[:, :, r]
        assert (row.sum(-1) == max(1, round(density * n_vis))).all()
        assert row[..., r].all()  # diagonal block always kept
        assert not row[..., r + 1:].any()  # nothing above the causal diagonal
    assert np.array_equal(keep, C.density_block_keep(2, 3, sq, sk, density, 128, seed=0))
    full = C.expand_block_mask(keep, sq, sk, 128)
    assert full.shape == (2, 3, sq, sk)
    assert not (full & ~C.causal_keep(sq, sk)).any()
    d = C.mask_density(full, sq, sk)
    if density == 1.0:
        assert d == 1.0
    else:
        assert 0.5 * density < d < 2.5 * density


def test_count_kept_in_chunks():
    m = np.random.default_rng(0).random((2, 3, 7, 11)) > 0.5
    for chunk in (1, 5, 64, 1 << 26):  # chunk boundaries inside and past the array
        assert C.count_kept(m, chunk) == int(m.sum())
    torch = pytest.importorskip("torch")
    assert C.count_kept(torch.from_numpy(m), 5) == int(m.sum())


def test_expand_block_mask_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    keep = C.density_block_keep(1, 2, 300, 520, 0.5, block=128, seed=3)
    a = C.expand_block_mask(keep, 300, 520, 128)
    b = C.expand_block_mask(torch.from_numpy(keep), 300, 520, 128).numpy()
    assert np.array_equal(a, b)


def test_skipped_tile_fraction():
    m = np.zeros((1, 1, 128, 128), dtype=bool)
    m[..., :64, :64] = True  # one of the 3 causally visible 64x64 tiles has kept keys
    assert C.skipped_tile_fraction(m, 64, 64) == pytest.approx(2 / 3)


def test_select_peers_and_gpu_names():
    from benchmarks.peers import select_peers
    assert select_peers("sdpa,flex") == ["sdpa_flash", "sdpa_cudnn", "sdpa_cudnn_bias",
                                         "sdpa_efficient", "flex", "flex_build"]
    assert select_peers("sdpa_cudnn") == ["sdpa_cudnn"]  # an exact name is not a family
    assert select_peers("sdpa_cudnn_bias,flex_build") == ["sdpa_cudnn_bias", "flex_build"]
    assert select_peers("none") == []
    with pytest.raises(ValueError):
        select_peers("xformers")
    assert report.gpu_short_name("NVIDIA H100 80GB HBM3") == "h100"
    assert report.gpu_short_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert report.gpu_short_name("NVIDIA H200") == "h200"


# ---- synthetic results -> report ------------------------------------------------------------
def _synthetic_records():
    base = dict(gpu="NVIDIA H100 80GB HBM3", commit="0" * 40, date="2026-11-23T00:00:00+00:00",
                torch="2.11.0", cupy="14.2.0", triton="3.6.0", suite="all")
    recs = []
    rng = np.random.default_rng(0)
    for c in C.CONFIGS.values():
        shape = dict(batch=c.batch, heads=c.heads, kv_heads=c.kv_heads, seqlen_q=c.seqlen_q,
                     seqlen_k=c.seqlen_k, head_dim=c.head_dim, mask=c.mask, has_bias=c.has_bias,
                     density_target=c.density)
        for p in ("fwd", "fwd_bwd"):
            for impl in ("dmattn_cupy",) + report.PEER_NAMES:
                r = dict(base, config=c.name, impl=impl, **{"pass": p}, **shape,
                         mask_density=c.density or 0.25, median_ms=float(rng.uniform(0.1, 5)),
                         peak_mem_gib=float(rng.uniform(0.1, 20)), check_rel_err=3e-3,
                         check_ok=True, same_function=impl not in ("sdpa_flash", "sdpa_cudnn"))
                if c.mask == "density":
                    r["median_ms"] = 2.0 * (c.density if impl == "dmattn_cupy" else 1.0)
                if impl == "flex" and p == "fwd_bwd" and c.name == "gqa8k_topk":
                    r.update(median_ms=None, peak_mem_gib=None,
                             error="out of memory: CUDA out of memory")
                recs.append(r)
        if c.has_mask:
            recs.append(dict(base, config=c.name, impl="topk_mask", **{"pass": "mask"}, **shape,
                             median_ms=1.5, mask_density=0.125))
    for p in ("fwd", "fwd_bwd"):
        recs.append(dict(base, config="-", impl="device_ceilings", **{"pass": p}, median_ms=None,
                         copy_bandwidth_TBps=3.0, matmul_tflops=760.0))
    return recs


def test_report_from_synthetic_results(tmp_path):
    recs = report.finalize(_synthetic_records(), 3.0e12, 760e12)
    ours = [r for r in recs if r["impl"] == "dmattn_cupy" and r["pass"] == "fwd"]
    for r in ours:
        assert r["floor_ms"] > 0 and r["roofline_fraction"] == pytest.approx(
            r["floor_ms"] / r["median_ms"])
        assert r["ratio_vs_sdpa_cudnn"] > 0
    bad = next(r for r in recs if r["config"] == "gqa8k_topk" and r["impl"] == "dmattn_cupy"
               and r["pass"] == "fwd_bwd")
    assert "ratio_vs_flex" not in bad  # flex errored there
    sweep = {r["config"]: r["time_vs_dense"] for r in recs
             if r["impl"] == "dmattn_cupy" and r.get("mask") == "density" and r["pass"] == "fwd"}
    assert sweep["gqa8k_dens0.25"] == pytest.approx(0.25)
    files = report.write_all(recs, tmp_path, "all", "h100")
    names = sorted(f.name for f in files)
    assert names == sorted(["all_fwd_h100.json", "all_fwd_bwd_h100.json", "all_h100.md",
                            "all_h100_speedup.png", "all_h100_sparsity.png",
                            "all_h100_memory.png"])
    assert len(files) <= 6
    for f in files:
        assert f.stat().st_size > 0
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "all_fwd_h100.json").read_text())
    assert {r["pass"] for r in data} == {"fwd", "mask"}
    for r in data:
        report.validate_record(r)
    md = (tmp_path / "all_h100.md").read_text()
    assert "| seed_32k |" in md and "out of memory" in md and "Sparsity sweep" in md
    # regenerate from JSON alone
    out = tmp_path / "regen"
    assert report.main([str(tmp_path / "all_fwd_h100.json"),
                        str(tmp_path / "all_fwd_bwd_h100.json"), "--out", str(out)]) == 0
    assert (out / "all_h100.md").exists() and (out / "all_h100_speedup.png").exists()


def test_targets_table_reports_each_forward_target():
    recs = report.finalize(_synthetic_records(), 3.0e12, 760e12)
    ms = {(r["config"], r["impl"]): r for r in recs if r["pass"] == "fwd"}
    ms[("decode_128k", "dmattn_cupy")]["median_ms"] = 0.04
    ms[("decode_128k", "sdpa_cudnn_bias")]["median_ms"] = 0.1   # 0.4x <= 0.5x: met
    ms[("seed_16k", "dmattn_cupy")]["median_ms"] = 0.8
    ms[("seed_16k", "flex")]["median_ms"] = 1.0                 # 0.8x > 0.5x: not met
    ms[("seed_4k", "flex")].update(median_ms=None, error="out of memory: ...")
    rows = {(c, t): (m, ok) for c, t, m, ok in report.target_rows(recs)}
    assert len(rows) == len(report.TARGETS) + len(C.SWEEP_DENSITIES)
    assert rows[("decode_128k", "≤ 0.5× sdpa_cudnn_bias")] == ("0.40× (0.040 / 0.100 ms)", True)
    assert rows[("seed_16k", "≤ 0.5× flex")][1] is False
    assert rows[("seed_4k", "≤ 0.8× flex")][1] is None  # the peer failed: cannot tell
    assert rows[("gqa8k_dens0.25", "time(d) / time(1) ≤ 0.35")] == ("0.25", True)
    md = report.markdown(recs)
    assert "### Forward targets" in md and "| decode_128k | ≤ 0.5× sdpa_cudnn_bias |" in md
    # forward + backward targets (issue 4): the same rows from the fwd_bwd records
    bwd = {(r["config"], r["impl"]): r for r in recs if r["pass"] == "fwd_bwd"}
    bwd[("gqa8k_topk", "dmattn_cupy")]["median_ms"] = 3.0
    bwd[("gqa8k_topk", "sdpa_cudnn")]["median_ms"] = 4.0     # 0.75x <= 1.0x: met
    bwd[("seed_16k", "dmattn_cupy")]["median_ms"] = 2.0
    bwd[("seed_16k", "flex")]["median_ms"] = 4.0             # 0.5x > 0.4x: not met
    rows = {(c, t): (m, ok) for c, t, m, ok in report.target_rows(recs, "fwd_bwd")}
    assert len(rows) == len(report.BWD_TARGETS) + len(C.SWEEP_DENSITIES)
    assert rows[("gqa8k_topk", "≤ 1× sdpa_cudnn")] == ("0.75× (3.000 / 4.000 ms)", True)
    assert rows[("seed_16k", "≤ 0.4× flex")][1] is False
    assert rows[("gqa8k_dens0.25", "time(d) / time(1) ≤ 0.4")] == ("0.25", True)
    assert "### Forward + backward targets (issue 4, H100)" in report.markdown(recs)


def test_validate_record_rejects_missing_fields():
    with pytest.raises(ValueError):
        report.validate_record({"config": "x", "impl": "dmattn_cupy", "pass": "fwd"})
    with pytest.raises(ValueError):  # no time and no error
        report.validate_record(dict(config="x", impl="flex", gpu="g", commit="c", date="d",
                                    median_ms=None, peak_mem_gib=None, **{"pass": "fwd"}))


def test_markdown_without_records():
    assert "no benchmark records" in report.markdown([])


# ---- the harness end to end on CPU ----------------------------------------------------------
@pytest.fixture
def cpu_harness():
    pytest.importorskip("torch")
    from benchmarks import peers
    old = dict(peers.SETTINGS)
    yield peers
    peers.SETTINGS.update(old)


def test_reference_matches_dmattn_numpy_path(cpu_harness):
    peers = cpu_harness
    peers.SETTINGS["device"] = "cpu"
    import dataclasses
    cfg = dataclasses.replace(C.CONFIGS["gqa8k_topk"].small(), seqlen_q=256, seqlen_k=256,
                              window=160)
    inp = peers.make_inputs(cfg, seed=0)
    assert inp.mask.dtype.is_floating_point is False and inp.mask.shape == cfg.bias_shape
    ours = peers.make_ours(inp)
    out = peers.as_torch(ours.fwd())
    ref, grads = peers.reference(inp, grads=True)
    assert peers.rel_err(out, ref) < 1e-5
    got = [peers.as_torch(g) for g in ours.fwd_bwd()]
    for g, r in zip(got, grads):
        assert peers.rel_err(g, r) < 1e-5


def test_harness_end_to_end_on_cpu(cpu_harness, tmp_path, capsys):
    from benchmarks.__main__ import main
    rc = main(["--suite", "decode", "--small", "--backward", "--device", "cpu",
               "--peers", "sdpa,flex", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("|")  # the table is printed last
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "decode_fwd_cpu-harness-self-test.json" in files
    assert "decode_fwd_bwd_cpu-harness-self-test.json" in files
    assert len(files) <= 6
    fwd = json.loads((tmp_path / "decode_fwd_cpu-harness-self-test.json").read_text())
    ours = next(r for r in fwd if r["impl"] == "dmattn_cupy" and r["pass"] == "fwd")
    for key in report.REQUIRED_FIELDS + ("floor_ms", "roofline_fraction", "ratio_vs_sdpa_cudnn",
                                         "check_rel_err"):
        assert key in ours, key
    assert ours["check_ok"] is True
    cudnn = next(r for r in fwd if r["impl"] == "sdpa_cudnn")
    assert cudnn["same_function"] is False  # no bias / mask: flagged
    for name in ("sdpa_efficient", "sdpa_cudnn_bias"):  # the bias peers compute our function
        eff = next(r for r in fwd if r["impl"] == name)
        assert eff["same_function"] is True and eff["check_ok"] is True
    flex = next(r for r in fwd if r["impl"] == "flex")
    assert flex["median_ms"] > 0 and flex["check_rel_err"] < 2e-2
    assert any(r["impl"] == "topk_mask" and r["pass"] == "mask" for r in fwd)
    bwd = json.loads((tmp_path / "decode_fwd_bwd_cpu-harness-self-test.json").read_text())
    flex_bwd = next(r for r in bwd if r["impl"] == "flex")
    assert flex_bwd["median_ms"] is None and "error" in flex_bwd  # CPU flex has no backward
    for r in fwd + bwd:
        report.validate_record(r)
