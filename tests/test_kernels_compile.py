"""CI's GPU-free kernel check: nvcc compiles the covering set of instantiations for sm_80 and
sm_90 (`-Xptxas -v`), so a syntax error or a register spill surfaces without a GPU.

The report (registers, spill bytes per kernel and arch) is printed. At head dims up to 128 —
the sizes the tiles are tuned for — a kernel may spill at most SPILL_LIMIT bytes per thread: the
forward tiles run at the 255-register cap, where ptxas spills a few values in some flag
combinations (they stay in L1); a larger spill means a tile no longer fits and fails the check.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from dmattn_cupy._cuda.compile import kernels_dir
from dmattn_cupy._cuda.instantiations import COVERING_SET

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

SPILL_LIMIT = 512  # bytes of spill stores + loads per thread
_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _archs(source: str) -> list[str]:
    return sorted({arch for _, _, archs in COVERING_SET[source] for arch in archs})


def _compile(source: str, arch: str, tmp_path) -> str:
    lines = [f'#include "{source}"']
    for name, params, archs in COVERING_SET[source]:
        if arch in archs:
            lines.append(f"template __global__ void {name}(const __grid_constant__ dmattn::{params});")
    unit = tmp_path / f"{source}.{arch}.cu"
    unit.write_text("\n".join(lines) + "\n")
    # sm_90a (wgmma) needs the -gencode spelling: -arch=sm_90a also runs a plain sm_90 pass.
    target = [f"-gencode=arch=compute_{arch[3:]},code={arch}"]
    done = subprocess.run(
        ["nvcc", "-std=c++17", *target, f"-I{kernels_dir()}", "-c", str(unit),
         "-o", str(unit.with_suffix(".o")), "-Xptxas", "-v"],
        capture_output=True, text=True)
    assert done.returncode == 0, f"nvcc failed for {source} ({arch}):\n{done.stderr[-4000:]}"
    return done.stderr


def _report(ptxas: str) -> list[tuple[str, str, int, int]]:
    """(mangled kernel, arch, registers, spill bytes) per compiled entry."""
    rows, entry = [], None
    for line in ptxas.splitlines():
        if m := _ENTRY.search(line):
            entry = m.groups()
        elif (m := _SPILL.search(line)) and entry:
            spill = int(m.group(1)) + int(m.group(2))
        elif (m := _REGS.search(line)) and entry:
            rows.append((*entry, int(m.group(1)), spill))
            entry = None
    return rows


@pytest.mark.parametrize("source", sorted(COVERING_SET))
def test_covering_set_compiles_without_spills(source, tmp_path):
    archs = _archs(source)
    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(lambda arch: _compile(source, arch, tmp_path), archs))
    rows = [row for out in outputs for row in _report(out)]
    print(f"\n{source}: registers / spill bytes")
    for kernel, arch, regs, spill in rows:
        print(f"  {arch} {regs:4d} regs {spill:5d} B spilled  {kernel}")
    assert len(rows) == sum(len(archs) for _, _, archs in COVERING_SET[source])
    # Kernels templated on HEAD_DIM carry it as the second template argument: ...ILi128E...
    small = [r for r in rows if (m := re.search(r"_tELi(\d+)E", r[0])) and int(m.group(1)) <= 128]
    spilled = [r for r in small if r[3] > SPILL_LIMIT]
    assert not spilled, f"register spills over {SPILL_LIMIT} B at head dim <= 128: {spilled}"
