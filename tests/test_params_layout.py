"""The NumPy mirrors in dmattn_cupy/_cuda/params.py match kernels_cu/params.cuh byte for byte.

Compiles a host program with nvcc that prints sizeof and every field's offsetof, and compares
with the structured dtypes. Needs nvcc (CI has it), not a GPU.
"""

from __future__ import annotations

import shutil

import pytest
from host_program import run_host_program

from dmattn_cupy._cuda.params import STRUCTS

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def _c_layout(tmp_path) -> dict[str, int]:
    lines = []
    for struct, dtype in STRUCTS.items():
        lines.append(f'  printf("{struct} %zu\\n", sizeof(dmattn::{struct}));')
        for field in dtype.names:
            lines.append(f'  printf("{struct}.{field} %zu\\n", offsetof(dmattn::{struct}, {field}));')
    out = run_host_program(tmp_path, ["params.cuh"], lines)
    return {name: int(value) for name, value in (line.split() for line in out)}


def test_structs_match_the_header(tmp_path):
    c = _c_layout(tmp_path)
    for struct, dtype in STRUCTS.items():
        assert c[struct] == dtype.itemsize, struct
        for field in dtype.names:
            assert c[f"{struct}.{field}"] == dtype.fields[field][1], f"{struct}.{field}"
