"""Runs a small host program against the kernel headers: how the CPU tests check that the Python
mirrors (params structs, tile traits, shared-memory carve-ups) match kernels_cu/ exactly.
Needs nvcc, not a GPU."""

from __future__ import annotations

import subprocess

from dmattn_cupy._cuda.compile import kernels_dir


def run_host_program(tmp_path, headers: list[str], body: list[str]) -> list[str]:
    """Compiles `int main() { body }` after #including `headers` (from kernels_cu/) with nvcc,
    runs it and returns its stdout lines."""
    includes = "".join(f"#include {h}\n" for h in ["<cstdio>", "<cstddef>"] + [f'"{h}"' for h in headers])
    src = tmp_path / "host_program.cu"
    src.write_text(includes + "int main() {\n" + "\n".join(body) + "\n}\n")
    exe = tmp_path / "host_program"
    subprocess.run(["nvcc", "-std=c++17", f"-I{kernels_dir()}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
