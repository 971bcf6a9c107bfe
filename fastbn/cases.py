"""The tables of layouts and of ops that drive the tests, ``python -m fastbn`` and the benchmarks.

Each layout names a shape convention and its channel axis, with a small shape for tests (big
enough that the multi-chunk paths run once the tests shrink the block sizes), a larger one for a
quick timing on any machine, the shapes the benchmark suite (``bench/``) times for bandwidth, and
the small shapes of NumPy trainers that it times for latency (per-call overhead). Each op
(``OPS``) names the bytes it moves and its fastbn, NumPy and PyTorch calls on a :class:`Case`,
the arrays of one shape on the CPU or the GPU.
"""
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numba
import numpy as np

import fastbn
from fastbn import _naive, _peers
from fastbn.cpu import _store_fence, _store_streaming, _streamed


class Layout(NamedTuple):
    name: str
    axis: int
    small: tuple  # for tests: fast, but more than one chunk at the tests' block sizes
    large: tuple  # for `python -m fastbn`: a few million elements, quick on any machine
    bench: tuple = ()  # for `pytest bench`: the shapes whose speed goals the README reports
    gpu_bench: tuple = ()  # and, with `--bench-device cuda`, these as well
    latency: tuple = ()  # for `pytest bench`'s latency group: the tensors NumPy trainers use


LAYOUTS = (
    Layout("NxD", 1, (37, 11), (16384, 512), bench=((8192, 4096), (256, 1024)),
           latency=((64, 100), (128, 512), (256, 1024))),
    Layout("NCL", 1, (5, 3, 29), (64, 128, 1024)),
    Layout("NCHW", 1, (4, 3, 7, 9), (32, 64, 56, 56),
           bench=((64, 64, 112, 112), (32, 256, 28, 28), (64, 3, 224, 224)),
           gpu_bench=((256, 64, 112, 112),), latency=((32, 16, 8, 8), (32, 32, 16, 16))),
    Layout("NCDHW", 1, (3, 2, 4, 5, 6), (8, 32, 16, 28, 28)),
    Layout("NHWC", -1, (4, 6, 7, 5), (32, 56, 56, 64), bench=((64, 112, 112, 64),),
           latency=((16, 8, 8, 32),)),
)


# -- the ops that `python -m fastbn` and `bench/` time, and the arrays they run on ---------------

MOMENTUM, EPS = 0.1, 1e-5


def host(a):
    """``a`` as a NumPy array: a CUDA array (a Numba device array, or the simulator's) copied to
    the host, anything else as it is."""
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a


def on_device(*arrays):
    """Copies of ``arrays`` on the GPU (``numba.cuda.to_device``, C-contiguous), as a list."""
    from numba import cuda
    return [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def _fastbn_train_forward(case):
    # out= writes y (or dx) into a preallocated array: fastbn's fast path, without allocation.
    x, gamma, beta, axis, out = case.x, case.gamma, case.beta, case.axis, case.out
    mean, var = case.running()
    return lambda: fastbn.forward(x, gamma, beta, axis=axis, running_mean=mean, running_var=var,
                                  momentum=MOMENTUM, eps=EPS, out=out)[0]


def _fastbn_eval_forward(case):
    x, gamma, beta, axis, out = case.x, case.gamma, case.beta, case.axis, case.out
    mean, var = case.running_mean, case.running_var
    return lambda: fastbn.forward(x, gamma, beta, axis=axis, training=False, running_mean=mean,
                                  running_var=var, eps=EPS, out=out)[0]


def _fastbn_train_backward(case):
    dy, x, gamma, axis, out = case.dy, case.x, case.gamma, case.axis, case.out
    _, stats = fastbn.forward(x, gamma, case.beta, axis=axis, eps=EPS)
    return lambda: fastbn.backward(dy, x, stats, gamma, axis=axis, out=out)


def _numpy_train_forward(case):
    x, gamma, beta, axis = case.x, case.gamma, case.beta, case.axis
    return lambda: _naive.forward(x, gamma, beta, axis, True, eps=EPS)[0]


def _numpy_eval_forward(case):
    x, gamma, beta, axis = case.x, case.gamma, case.beta, case.axis
    mean, var = case.running_mean, case.running_var
    return lambda: _naive.forward(x, gamma, beta, axis, False, mean, var, EPS)[0]


def _numpy_train_backward(case):
    dy, x, gamma, axis = case.dy, case.x, case.gamma, case.axis
    _, mean, invstd = _naive.forward(x, gamma, case.beta, axis, True, eps=EPS)
    return lambda: _naive.backward(dy, x, mean, invstd, gamma, axis, True)


class Op(NamedTuple):
    """One timed op: what it returns, the bytes it must move at the least, and its calls.

    ``fastbn`` and ``numpy`` take a :class:`Case` and return the call to time (fastbn's writes
    into ``case.out``, or a new array where that is None; NumPy's is ``fastbn._naive`` in the
    case's dtype); ``peer`` names the method of a peer (:func:`peer`) that runs it.
    """
    name: str
    outputs: tuple  # the names of what a call returns
    moves: int  # bytes moved at the least, in x.nbytes: x and y; or dy, x and dx
    fastbn: Callable
    numpy: Callable
    peer: str


OPS = (
    Op("train fwd", ("y",), 2, _fastbn_train_forward, _numpy_train_forward, _peers.TRAIN_FORWARD),
    Op("eval fwd", ("y",), 2, _fastbn_eval_forward, _numpy_eval_forward, _peers.EVAL_FORWARD),
    Op("train bwd", ("dx", "dgamma", "dbeta"), 3, _fastbn_train_backward, _numpy_train_backward,
       _peers.TRAIN_BACKWARD),
)
PEERS = tuple(_peers.LABELS)  # torch, jax, tensorflow, onnxruntime


@numba.njit(parallel=True, cache=True, nogil=True)
def threaded_copy(source, target):
    """``target[...] = source`` (C-contiguous, same shape) on Numba's threads, in pieces of
    64 KB: a plain copy with as many threads as fastbn's kernels use."""
    flat, into = source.reshape(source.size), target.reshape(target.size)
    piece = max(1, 65536 // source.itemsize)
    for k in numba.prange((flat.size + piece - 1) // piece):
        for i in range(k * piece, min((k + 1) * piece, flat.size)):
            into[i] = flat[i]


@numba.njit(cache=True, nogil=True)
def _copy_streamed(source, target):
    head, body = _streamed(target)
    target[:head] = source[:head]
    piece, into = source[head:body], target[head:body]
    for i in range(into.size):
        _store_streaming(into, i, piece[i])
    target[body:] = source[body:]


@numba.njit(parallel=True, cache=True, nogil=True)
def streaming_copy(source, target):
    """``threaded_copy`` with the streaming stores of fastbn's maps (fastbn.cpu): the bound of
    a map that writes its output past the cache."""
    flat, into = source.reshape(source.size), target.reshape(target.size)
    piece = max(1, 65536 // source.itemsize)
    for k in numba.prange((flat.size + piece - 1) // piece):
        _copy_streamed(flat[k * piece:(k + 1) * piece], into[k * piece:(k + 1) * piece])
        _store_fence()


class Case:
    """The arrays of one layout and shape, on the CPU or the GPU (``device="cuda"``: Numba device
    arrays), and the float64 NumPy reference of each op."""

    ARRAYS = ("x", "dy", "gamma", "beta", "running_mean", "running_var")

    def __init__(self, layout, shape, dtype, device="cpu"):
        rng = np.random.default_rng(0)
        channels = shape[layout.axis]
        self.axis, self.device = layout.axis, device
        x = rng.standard_normal(shape, dtype)
        x *= 2  # in place: no temporary the size of x
        x += 3
        self.host = dict(zip(self.ARRAYS, (
            x, rng.standard_normal(shape, dtype), rng.uniform(0.5, 1.5, channels).astype(dtype),
            rng.normal(size=channels).astype(dtype),
            rng.normal(3.0, 0.1, channels).astype(dtype),
            rng.uniform(3.0, 5.0, channels).astype(dtype))))
        arrays = on_device(*self.host.values()) if device == "cuda" else self.host.values()
        for name, a in zip(self.ARRAYS, arrays):
            setattr(self, name, a)
        if device == "cuda":
            from numba import cuda
            self.out = cuda.device_array_like(self.x)
        else:
            self.out = np.empty_like(self.x)
        self._reference = None, None

    def running(self):
        """Fresh copies of the running statistics, for a call that updates them."""
        copies = self.host["running_mean"].copy(), self.host["running_var"].copy()
        return tuple(on_device(*copies)) if self.device == "cuda" else copies

    def synchronized(self, call):
        """``call``, ending with a device synchronization on the GPU (so that timing is real)."""
        if self.device != "cuda":
            return call
        from numba import cuda

        def run():
            result = call()
            cuda.synchronize()  # the whole device: PyTorch's kernels too
            return result
        return run

    def memcpy(self):
        """A copy of x into ``out``: ``np.copyto`` (one thread); on the GPU, device to device."""
        x, out = self.x, self.out
        if self.device == "cuda":
            return lambda: out.copy_to_device(x)
        return lambda: np.copyto(out, x)

    def threaded_copy(self):
        """A copy of x into ``out`` with Numba's threads (``threaded_copy``); CPU only. The
        yardstick is the faster of it and :meth:`memcpy`: the fastest plain copy of the tensor
        with the thread count fastbn uses."""
        x, out = self.x, self.out
        threaded_copy(x, out)  # compiled (or loaded from the cache) before it is timed
        return lambda: threaded_copy(x, out)

    def streaming_copy(self):
        """:meth:`threaded_copy` with streaming stores (``streaming_copy``); CPU only. Shown
        beside the yardstick, not part of it: the bound of fastbn's streaming maps."""
        x, out = self.x, self.out
        streaming_copy(x, out)
        return lambda: streaming_copy(x, out)

    def reference(self, op):
        """The outputs of ``op``: its NumPy call on float64 copies of the host arrays."""
        if self._reference[0] != op.name:
            self._reference = None, None  # free the last op's before computing this one's
            wide = SimpleNamespace(axis=self.axis, **{name: a.astype(np.float64)
                                                      for name, a in self.host.items()})
            self._reference = op.name, _as_tuple(op.numpy(wide)())
        return self._reference[1]

    def errors(self, op, result, to_numpy=host):
        """``{output name: error}`` of an op's ``result`` against :meth:`reference`: max|actual -
        reference| over max(1, max|reference|), NaN where there is one; ``to_numpy`` turns each
        output into a NumPy array. Raises ValueError for an output of the wrong shape."""
        errors = {}
        for name, actual, expected in zip(op.outputs, _as_tuple(result), self.reference(op),
                                          strict=True):
            actual = to_numpy(actual)
            if actual.shape != expected.shape:
                raise ValueError(f"{name} has shape {actual.shape}, expected {expected.shape}")
            scale = max(1.0, float(np.max(np.abs(expected))))
            errors[name] = float(np.max(np.abs(actual - expected))) / scale
        return errors


def peer(case, name):
    """Peer ``name`` (one of PEERS: ``fastbn._peers``) on the case's arrays; raises
    ``fastbn._peers.Unavailable`` with the reason where it cannot run here."""
    return _peers.make(name, case, MOMENTUM, EPS)


def torch_batch_norm(case):
    """PyTorch's ops on the case's arrays (``fastbn._torch.TorchBatchNorm``), or None where
    PyTorch (on the GPU: PyTorch with CUDA) is not installed."""
    try:
        return peer(case, "torch")
    except _peers.Unavailable:
        return None
