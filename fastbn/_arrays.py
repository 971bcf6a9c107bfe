"""What kind of array an argument is, NumPy or CUDA, and what memory it spans.

A CUDA array is any object with ``__cuda_array_interface__`` (CuPy, PyTorch, Numba), or an array
of Numba's CUDA simulator, which the tests run the GPU path on. Nothing here imports numba.cuda
unless a CUDA array is given.
"""
import math

import numpy as np


def is_cuda_array(a):
    """Whether ``a`` lives on the GPU."""
    if isinstance(a, np.ndarray):
        return False
    try:
        exposed = hasattr(a, "__cuda_array_interface__")
    except RuntimeError as error:  # PyTorch refuses it for a tensor that requires grad
        raise TypeError(f"a CUDA tensor that requires grad was given; pass tensor.detach() "
                        f"({error})") from None
    return exposed or type(a).__module__.startswith("numba.cuda.simulator")


def device_view(a, name="the array"):
    """A zero-copy Numba device array of a CUDA array (CuPy, PyTorch, Numba, ...), on the GPU
    that holds it (fastbn.cuda.device_view; ``name`` for its errors)."""
    if not hasattr(a, "__cuda_array_interface__"):
        return a  # the simulator's arrays are Numba's device arrays already
    from . import cuda
    return cuda.device_view(a, name)


def call_steps(device, stream, **arrays):
    """The steps that run a checked call on ``device`` (fastbn.cpu or fastbn.cuda): the CPU
    module as it is (``stream`` is for the GPU and ignored here), or fastbn.cuda's steps bound to
    the call's stream and to the GPU that holds ``arrays`` (fastbn.cuda.for_call)."""
    if device.NAME != "cuda":
        return device
    return device.for_call(stream, **arrays)


def interface(a):
    """The array interface of a NumPy or CUDA array: data pointer, read-only flag, typestr."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__
    if hasattr(a, "__cuda_array_interface__"):
        return a.__cuda_array_interface__
    return np.asarray(a).__array_interface__  # the simulator's arrays live on the host


def is_read_only(a):
    """The array's own read-only flag (a Numba view of a read-only CUDA array says writable)."""
    if isinstance(a, np.ndarray):
        return not a.flags.writeable
    return bool(interface(a)["data"][1])


def byte_range(a):
    """``[low, high)`` of the bytes a (NumPy or CUDA) array may touch, from its interface."""
    described = interface(a)
    shape = tuple(described["shape"])
    itemsize = np.dtype(described["typestr"]).itemsize
    strides = described.get("strides") or tuple(  # None: C-contiguous
        itemsize * math.prod(shape[k + 1:]) for k in range(len(shape)))
    low = high = described["data"][0]
    for n, stride in zip(shape, strides):
        if n == 0:
            return low, low
        if stride > 0:
            high += (n - 1) * stride
        else:
            low += (n - 1) * stride
    return low, high + itemsize


def overlaps(a, b):
    """Whether two arrays may share memory (a problem too hard to decide counts as yes)."""
    if is_cuda_array(a) or is_cuda_array(b):  # device memory: by address ranges
        if is_cuda_array(a) != is_cuda_array(b):
            return False
        (a0, a1), (b0, b1) = byte_range(a), byte_range(b)
        return a0 < b1 and b0 < a1
    if not np.may_share_memory(a, b):  # disjoint address ranges: cheap to tell
        return False
    try:
        return np.shares_memory(a, b, max_work=1 << 16)
    except np.exceptions.TooHardError:
        return True
