"""The one place that turns an array and its channel axis into the ``(outer, C, inner)`` view.

N×D becomes ``(N, D, 1)``, N×C×H×W ``(N, C, H·W)``, N×H×W×C ``(N·H·W, C, 1)``: a reshape, never a
copy. An array whose axes are merely permuted in memory (a transposed NHWC array read as NCHW, a
Fortran-order array) is viewed in its memory order, so it is not copied either; only an array with
gaps or negative strides is copied to a contiguous one. A CUDA array must be C-contiguous (the
checks see to it) and is viewed as it is; a NumPy array bound for the GPU is viewed in C order, as
it is copied there (``in_memory_order=False``).
"""
import math

import numpy as np

from . import _outputs


class ChannelView:
    """How arrays of one shape, memory order and channel axis map onto ``(outer, C, inner)``."""

    def __init__(self, x, axis, in_memory_order=True):
        perm = identity = tuple(range(x.ndim))
        if in_memory_order and isinstance(x, np.ndarray) and not x.flags.c_contiguous:
            by_stride = tuple(sorted(perm, key=lambda a: -x.strides[a]))
            if x.transpose(by_stride).flags.c_contiguous:
                perm = by_stride
        self.perm = perm
        self.inverse = perm if perm == identity else tuple(int(a) for a in np.argsort(perm))
        self.memory_shape = tuple(x.shape[a] for a in perm)
        k = perm.index(axis)
        self.shape = (math.prod(self.memory_shape[:k]), x.shape[axis],
                      math.prod(self.memory_shape[k + 1:]))

    def of(self, a):
        """``a`` (x's shape) as ``(outer, C, inner)``: a view if ``a`` is laid out like x, else a copy."""
        if not isinstance(a, np.ndarray):  # a C-contiguous CUDA array
            return a.reshape(self.shape)
        return np.ascontiguousarray(a.transpose(self.perm)).reshape(self.shape)

    def output(self, out, dtype):
        """Where a kernel writes a result of x's shape.

        Returns ``(result, result3, pending)``: the array to hand back, the ``(outer, C, inner)``
        array the kernel writes, and ``None`` or a buffer to copy into ``out`` afterwards (when
        ``out`` is not laid out like x). A new result has x's memory order, like ``np.empty_like``
        (large ones from ``fastbn._outputs``' cache).
        """
        if out is not None:
            in_order = out.transpose(self.perm)
            if in_order.flags.c_contiguous:
                return out, in_order.reshape(self.shape), None
        buffer = _outputs.empty(self.memory_shape, dtype)
        result = buffer.transpose(self.inverse)
        if out is None:
            return result, buffer.reshape(self.shape), None
        return out, buffer.reshape(self.shape), result


class GroupView:
    """Arrays of x's shape as the normalization family reads them: ``(rows, P, S)`` in C order.

    Statistics are taken per row, over its ``P·S`` contiguous values; element ``(r, p, s)`` is
    scaled by parameter ``(r % groups)·P + p`` (docs/design.md §2.7). Layer and RMS norm are
    ``(prod(lead), prod(normalized_shape), 1)``, group norm ``(N·G, C/G, spatial)``, instance norm
    ``(N·C, 1, spatial)``. A NumPy array that is not C-contiguous is copied; a CUDA array is
    C-contiguous (the checks see to it).
    """

    def __init__(self, x, shape):
        self.x_shape = x.shape
        self.shape = shape

    def of(self, a):
        """``a`` (x's shape) as ``(rows, P, S)``: a view if it is C-contiguous, else a copy."""
        if not isinstance(a, np.ndarray):
            return a.reshape(self.shape)
        return np.ascontiguousarray(a).reshape(self.shape)

    def output(self, out, dtype):
        """``(result, result3, pending)`` as ``ChannelView.output``: ``out`` if C-contiguous,
        else a new C-contiguous buffer copied into ``out`` afterwards."""
        if out is not None and out.flags.c_contiguous:
            return out, out.reshape(self.shape), None
        buffer = _outputs.empty(self.x_shape, dtype)
        if out is None:
            return buffer, buffer.reshape(self.shape), None
        return out, buffer.reshape(self.shape), buffer
