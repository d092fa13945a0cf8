"""Which array module an API call runs on: NumPy (reference path) or CuPy (CUDA kernels).

CuPy is optional, so it is never imported just to look at an array: an array counts as CuPy
when its type comes from the ``cupy`` package, and only then is ``cupy`` imported.
"""

from __future__ import annotations

from types import ModuleType

import numpy


def _is_cupy_array(array: object) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def _module_of(name: str, array: object) -> ModuleType:
    if isinstance(array, numpy.ndarray):
        return numpy
    if _is_cupy_array(array):
        import cupy

        return cupy
    raise TypeError(
        f"{name} must be a numpy.ndarray or a cupy.ndarray; got {type(array).__qualname__}"
    )


def array_module(**arrays: object) -> ModuleType:
    """Return numpy or cupy for the named arrays (None entries are skipped).

    Raises TypeError naming the arguments when NumPy and CuPy arrays are mixed, or when an
    argument is not an array at all.
    """
    modules = {name: _module_of(name, array) for name, array in arrays.items() if array is not None}
    if not modules:
        raise TypeError("at least one array argument is required")
    found = set(modules.values())
    if len(found) > 1:
        kinds = ", ".join(f"{name} is {module.__name__}" for name, module in modules.items())
        raise TypeError(f"cannot mix NumPy and CuPy arrays in one call ({kinds})")
    return found.pop()


def is_cupy(xp: ModuleType) -> bool:
    return xp is not numpy


def cuda_device_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDARuntimeError when there is no driver or device
        return False
