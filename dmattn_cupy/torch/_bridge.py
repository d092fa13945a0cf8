"""Zero-copy hand-off between torch tensors and the arrays dmattn_cupy computes on.

CPU tensors become NumPy arrays (``t.detach().numpy()`` shares memory, strides included);
the reference path computes in float32, or float64 for float64 input, so float16/bfloat16 CPU
tensors are converted to float32 first and the results converted back.

CUDA tensors become CuPy arrays through DLPack (``cupy.from_dlpack``), strides included: a
transposed view or an expanded (zero-stride) mask is read where it lies. Inside
``cupy_on_torch(device)`` two things hold:

* CuPy allocates through torch's caching allocator: each CuPy allocation is a ``torch.uint8``
  tensor that the CuPy memory pointer keeps alive, and a result is handed back as a tensor of
  its dtype on that same storage (no copy; ``torch.from_dlpack`` for anything else);
* CuPy's current stream is torch's current stream (``cupy.cuda.ExternalStream``), so kernels
  queue behind the torch work that produced their inputs, with no device-wide sync.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, MutableMapping

import numpy
import torch

# ---------------------------------------------------------------------------------------------
# CPU: NumPy reference path


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the NumPy reference computes in for tensors of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_numpy(tensor: torch.Tensor | None, dtype: torch.dtype | None = None):
    """A NumPy view of a CPU tensor (a converted copy only when `dtype` differs)."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    elif tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: a float mask, read as float32
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def from_numpy(array, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor of `dtype` holding a result array of the reference path."""
    array = numpy.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(dtype)


# ---------------------------------------------------------------------------------------------
# CUDA: CuPy kernels


def _torch_allocator(device: torch.device, owners: MutableMapping[int, torch.Tensor]):
    """A CuPy allocator handing out torch-owned device memory (see the module docstring)."""
    import cupy

    index = device.index

    def allocate(nbytes: int):
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        owners[buffer.data_ptr()] = buffer
        memory = cupy.cuda.UnownedMemory(buffer.data_ptr(), nbytes, buffer, index)
        return cupy.cuda.MemoryPointer(memory, 0)

    return allocate


class CupyContext:
    """What is live inside ``cupy_on_torch``: which torch buffer backs each CuPy allocation."""

    def __init__(self, device: torch.device):
        self.device = device
        # pointer -> buffer, for as long as something (a CuPy array, a result) holds the buffer
        self.owners: MutableMapping[int, torch.Tensor] = weakref.WeakValueDictionary()

    def to_cupy(self, tensor: torch.Tensor | None):
        """A CuPy array sharing the tensor's memory and strides (no copy)."""
        if tensor is None:
            return None
        import cupy

        tensor = tensor.detach()  # DLPack refuses tensors that require grad
        try:
            return cupy.from_dlpack(tensor)
        except (BufferError, TypeError, NotImplementedError) as error:
            return _cupy_view(tensor, error)

    def to_torch(self, array) -> torch.Tensor:
        """A tensor sharing a CuPy result's memory, no copy.

        Results allocated inside this context become tensors on the very torch buffer that
        backs them (so the caching allocator's record_stream and memory statistics see a
        plain allocator block); anything else goes through DLPack.
        """
        base = self.owners.get(array.data.mem.ptr)
        if base is None:
            return torch.from_dlpack(array)
        dtype = _TORCH_DTYPES[numpy.dtype(array.dtype).name]
        offset = (array.data.ptr - base.data_ptr()) // array.itemsize
        strides = tuple(s // array.itemsize for s in array.strides)
        tensor = torch.empty(0, dtype=dtype, device=self.device)
        return tensor.set_(base.untyped_storage(), offset, tuple(array.shape), strides)


_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float32": torch.float32, "float64": torch.float64, "bool": torch.bool,
                 "uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32}


def _cupy_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        import ml_dtypes  # CuPy's bfloat16 is ml_dtypes.bfloat16

        return numpy.dtype(ml_dtypes.bfloat16)
    return numpy.dtype(str(dtype).removeprefix("torch."))


def _cupy_view(tensor: torch.Tensor, error: Exception):
    """Fallback when DLPack refuses a tensor: wrap its pointer and strides directly."""
    import cupy

    try:
        dtype = _cupy_dtype(tensor.dtype)
    except (ImportError, TypeError) as dtype_error:
        raise TypeError(f"cannot hand a {tensor.dtype} tensor to CuPy ({error})") from dtype_error
    itemsize = tensor.element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()) if n > 0)
    memory = cupy.cuda.UnownedMemory(tensor.data_ptr(), extent * itemsize, tensor,
                                     tensor.device.index)
    return cupy.ndarray(tuple(tensor.shape), dtype, cupy.cuda.MemoryPointer(memory, 0),
                        strides=tuple(s * itemsize for s in tensor.stride()))


@contextlib.contextmanager
def cupy_on_torch(device: torch.device) -> Iterator[CupyContext]:
    """Run CuPy on `device`, on torch's current stream, allocating through torch."""
    import cupy

    context = CupyContext(device)
    stream = torch.cuda.current_stream(device)
    with torch.cuda.device(device), cupy.cuda.Device(device.index), \
            cupy.cuda.using_allocator(_torch_allocator(device, context.owners)), \
            cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
        yield context
