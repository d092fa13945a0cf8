"""Shared test setup: the `gpu` marker.

Mark a test `@pytest.mark.gpu` when it needs CuPy and a CUDA device: on a machine without
them it is skipped (not failed). Tests that need the cupy module itself take the `cupy`
fixture, which also skips without a device.
"""

import pytest

from dmattn_cupy._arrays import cuda_device_available

_HAS_CUDA_DEVICE = cuda_device_available()


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA_DEVICE:
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cupy():
    """The cupy module; skips the test when CuPy or a CUDA device is missing."""
    if not _HAS_CUDA_DEVICE:
        pytest.skip("needs CuPy and a CUDA device")
    import cupy

    return cupy
