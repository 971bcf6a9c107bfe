"""A minimal producer of ``__cuda_array_interface__`` (version 3), as CuPy and PyTorch are: the
tests' way into fastbn's interface path, on a GPU and under Numba's CUDA simulator alike.

The memory is a Numba device array's (under the simulator, host memory); the interface reports its
pointer, with ``strides`` None or explicit, the read-only flag and, if asked, a ``stream`` key.
"""
import numba
import numpy as np
from numba import cuda

from fastbn._arrays import interface


class FakeCudaArray:
    """``host`` copied to the device and exposed only through ``__cuda_array_interface__``.

    ``strides``: ``None`` (C-contiguous, said so), or ``"explicit"`` to spell them out; ``every``
    keeps every ``every``-th value of a 1-D ``host`` (explicit strides with gaps).
    """

    def __init__(self, host, strides=None, read_only=False, stream=None, every=1):
        host = np.ascontiguousarray(host)
        if every > 1:
            spread = np.zeros(host.size * every, host.dtype)
            spread[::every] = host
            self.base = cuda.to_device(spread)
            strides = (host.itemsize * every,)
        else:
            self.base = cuda.to_device(host)
            strides = host.strides if strides == "explicit" else None
        self.every = every
        self.shape, self.dtype = host.shape, host.dtype
        self.described = {"shape": host.shape, "typestr": host.dtype.str,
                          "data": (interface(self.base)["data"][0], read_only),
                          "strides": strides, "version": 3}
        if stream is not None:
            self.described["stream"] = stream

    @property
    def __cuda_array_interface__(self):
        return dict(self.described)

    def host(self):
        """The values, as a NumPy array."""
        return self.base.copy_to_host()[::self.every]


def new_stream():
    """``(stream, handle)``: a stream to name in an interface's ``stream`` key, kept alive by the
    caller, and its integer handle (under the simulator, which has no handles, a made-up one)."""
    if numba.config.ENABLE_CUDASIM:
        return None, 4321
    stream = cuda.stream()
    return stream, int(stream)
