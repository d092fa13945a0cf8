"""Run-time compilation of kernels_cu/ with NVRTC through cupy.RawModule.

One RawModule per (source file, kernel instantiation), compiled on first use and cached for the
process (CuPy also caches the binary on disk). The source text carries a hash of every file in
kernels_cu/, so editing a header invalidates CuPy's disk cache as well.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_LOADED_MODULES: list = []


def kernels_dir() -> Path:
    """kernels_cu/ inside an installed wheel, else beside the package in a source checkout."""
    for candidate in (_PACKAGE_DIR / "kernels_cu", _PACKAGE_DIR.parent / "kernels_cu"):
        if (candidate / "params.cuh").is_file():
            return candidate
    raise FileNotFoundError(f"kernels_cu/ not found next to {_PACKAGE_DIR}")


@functools.lru_cache(maxsize=None)
def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(kernels_dir().glob("*.cu*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def element_type(dtype) -> str:
    """C++ tag type of a q/k/v dtype (template argument of every kernel)."""
    name = numpy.dtype(dtype).name
    if name == "float16":
        return "dmattn::fp16_t"
    if name == "bfloat16":
        return "dmattn::bf16_t"
    raise TypeError(f"CUDA kernels take float16 or bfloat16 q/k/v; got {name}")


def kernel_name(function: str, *template_args) -> str:
    """`dmattn::fwd_kernel<dmattn::bf16_t, 128, 1, 2, true, false>` from its parts."""
    def render(x):
        if isinstance(x, bool):
            return "true" if x else "false"
        return str(x)
    return f"dmattn::{function}<{', '.join(render(x) for x in template_args)}>"


@functools.lru_cache(maxsize=None)
def get_kernel(source: str, name: str, arch: str | None = None):
    """The compiled kernel `name` (a kernel_name(...) string) from kernels_cu/`source`.

    `arch` None: CuPy's RawModule, for the current GPU's architecture. `arch` "sm_90a": NVRTC
    directly, since the Hopper-only instructions (wgmma) need the arch-specific target that
    RawModule does not offer.

    The dynamic shared-memory limit is raised once to the device's opt-in maximum: the limit
    belongs to the CUDA function, which every handle of the same compiled name shares, so it
    is never lowered per launch (occupancy follows the bytes a launch asks for, not the limit).
    """
    import cupy
    from cupy.cuda import driver

    code = f'// kernels_cu digest {_sources_digest()}\n#include "{source}"\n'
    options = ("-std=c++17", f"-I{kernels_dir()}")
    if arch is None:
        module = cupy.RawModule(code=code, options=options, name_expressions=(name,))
        function = module.get_function(name).kernel
    else:
        function = _nvrtc_kernel(code, options + (f"-arch={arch}",), name)
    optin = cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    static = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, function.ptr)
    driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            optin - static)
    return function


def _nvrtc_kernel(code: str, options: tuple[str, ...], name: str):
    """Compiles `code` to a cubin with NVRTC and loads the instantiation `name`."""
    from cupy.cuda import function, nvrtc

    prog = nvrtc.createProgram(code, "dmattn_kernels.cu", [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as error:
            raise RuntimeError(f"NVRTC failed for {name}:\n{nvrtc.getProgramLog(prog)}") from error
        cubin = nvrtc.getCUBIN(prog)
        lowered = nvrtc.getLoweredName(prog, name)
    finally:
        nvrtc.destroyProgram(prog)
    module = function.Module()
    module.load(cubin)
    _LOADED_MODULES.append(module)  # a function lives as long as its module
    return module.get_function(lowered)


def launch(kernel, grid, block: int, params: numpy.ndarray, shared_mem: int = 0) -> None:
    """Launches `kernel` (a loaded function) on CuPy's current stream; `params` holds the bytes
    of the kernel's one by-value struct (a record, or its uint64 view)."""
    from cupy.cuda import get_current_stream

    buffer = ParamBuffer(params)  # alive until the driver has copied the struct
    launch_args(kernel, grid, block, buffer.args, shared_mem, get_current_stream().ptr)


class ParamBuffer:
    """The void* kernelParams[1] array pointing at a kernel's by-value struct `params` (kept alive
    here), made once: calls that launch the same kernels over and over (decode steps) store their
    pointers into `params` and launch with `args`, creating no array and no ctypes object."""

    def __init__(self, params: numpy.ndarray):
        self._params = params
        self._pointer = numpy.array([params.ctypes.data], dtype=numpy.uint64)
        self.args = self._pointer.ctypes.data  # address of kernelParams


def launch_args(kernel, grid, block: int, args: int, shared_mem: int, stream: int) -> None:
    """cuLaunchKernel straight from the driver: the struct is passed by address (`args`, a
    ParamBuffer's) and the driver copies its bytes during the call, so no per-argument conversion
    runs in Python (CuPy's cost ~13 us per launch) and the struct may be refilled at once."""
    from cupy.cuda import driver

    gx, gy, gz = (*grid, 1, 1)[:3]
    driver.launchKernel(kernel.ptr, gx, gy, gz, block, 1, 1, shared_mem, stream, args, 0)
