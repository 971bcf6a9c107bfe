"""The tables of layouts and of ops that drive the tests, ``python -m fastbn`` and the benchmarks.

Each layout names a shape convention and its channel axis, with a small shape for tests (big
enough that the multi-chunk paths run once the tests shrink the block sizes), a larger one for a
quick timing on any machine, the shapes the benchmark suite (``bench/``) times for bandwidth, and
the small shapes of NumPy trainers that it times for latency (per-call overhead). Each op
(``OPS``) names the bytes it moves and its fastbn, NumPy and PyTorch calls on a :class:`Case`,
the arrays of one shape on the CPU or the GPU. ``FAMILY`` does the same for the normalization
family (layer, RMS, group and instance norm: :class:`Norm`, :class:`NormCase`).
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
        return {name: relative_error(to_numpy(actual), expected, name)
                for name, actual, expected in zip(op.outputs, _as_tuple(result),
                                                  self.reference(op), strict=True)}


def relative_error(actual, expected, name="a result"):
    """max|actual - expected| over max(1, max|expected|), NaN where there is one; raises
    ValueError when the shapes differ."""
    if actual.shape != expected.shape:
        raise ValueError(f"{name} has shape {actual.shape}, expected {expected.shape}")
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(actual - expected))) / scale


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


# -- the normalization family: layer, group, instance and RMS norm ------------------------------


class Norm(NamedTuple):
    """One op of the normalization family (``fastbn.layer_norm``, ``group_norm``,
    ``instance_norm``, ``rms_norm`` and their ``*_backward``), with its shapes: a small one for
    tests, the shapes the benchmark suite times for bandwidth and the trainer-sized ones.

    Every op takes statistics per row of x (C-contiguous) seen as ``(rows, groups, P, S)``, over
    a row's ``P·S`` contiguous values, and scales element ``(r, g, p, s)`` by parameter
    ``g·P + p`` (:meth:`view`): layer and RMS norm normalize the last axis (``groups`` 1, ``P``
    its length, ``S`` 1), group norm ``(N, G, C/G, spatial)``, instance norm
    ``(N, C, 1, spatial)``. RMS norm divides by the root mean square, without centring or beta.
    """
    name: str  # "layer norm", ...: the benchmarks' and the report's
    function: str  # fastbn's: layer_norm, ...; the backward is function + "_backward"
    small: tuple  # for tests and `pytest bench --bench-quick`
    bench: tuple = ()  # for `pytest bench`: bandwidth
    latency: tuple = ()  # and the small tensors of NumPy trainers: per-call overhead
    groups: int = 0  # group norm's G (0: not group norm)
    centred: bool = True  # False for RMS norm: x / sqrt(mean(x²) + eps), no beta

    @property
    def channels(self):
        """True where x is N×C×spatial (group and instance norm), False where the op normalizes
        the last axis (layer and RMS norm)."""
        return self.function in ("group_norm", "instance_norm")

    def view(self, shape):
        """``(rows, groups, P, S)``: x's shape as the op groups its values."""
        if not self.channels:
            return (int(np.prod(shape[:-1])), 1, shape[-1], 1)
        n, c, spatial = shape[0], shape[1], int(np.prod(shape[2:]))
        groups = self.groups or c
        return (n, groups, c // groups, spatial)

    def parameter_shape(self, shape):
        """The shape of gamma (and beta): normalized_shape, or (C,)."""
        return (shape[1],) if self.channels else (shape[-1],)

    def stats_shape(self, shape):
        """The shape of the statistics fastbn returns (``NormStats``' mean and invstd)."""
        view = self.view(shape)
        return tuple(shape[:-1]) if not self.channels else (view[0], view[1])

    def outputs(self, backward):
        """The names of what a forward (or backward) call returns."""
        if not backward:
            return ("y",)
        return ("dx", "dgamma", "dbeta") if self.centred else ("dx", "dgamma")


_NCHW = next(layout for layout in LAYOUTS if layout.name == "NCHW")
GROUPS = 32  # group norm's G in the tables: the usual one (ResNet and diffusion-model blocks)

FAMILY = (
    Norm("layer norm", "layer_norm", (5, 3, 29),
         bench=((8192, 1024), (4096, 768), (64, 128, 768)), latency=((64, 100), (32, 16, 64))),
    Norm("RMS norm", "rms_norm", (5, 3, 29),
         bench=((8192, 1024), (4096, 768), (64, 128, 768)), latency=((64, 100), (32, 16, 64)),
         centred=False),
    # Group norm on the planar bench shapes whose C is a multiple of G.
    Norm("group norm", "group_norm", (3, 64, 5, 7),
         bench=tuple(s for s in _NCHW.bench if s[1] % GROUPS == 0),
         latency=((32, 32, 16, 16),), groups=GROUPS),
    Norm("instance norm", "instance_norm", _NCHW.small, bench=_NCHW.bench,
         latency=((32, 16, 8, 8),)),
)


class NormCase:
    """The arrays of one op of the family on one shape (CPU), and fastbn's calls on them.

    x is ``2·N(0, 1) + 3`` like :class:`Case`'s, dy standard normal, gamma uniform in
    [0.5, 1.5] and beta normal, of the op's parameter shape (RMS norm has no beta: None);
    ``out`` and ``dx`` are the used outputs that fastbn's timed calls write into."""

    ARRAYS = ("x", "dy", "gamma", "beta")

    def __init__(self, norm, shape, dtype):
        rng = np.random.default_rng(0)
        self.norm, self.shape = norm, tuple(shape)
        x = rng.standard_normal(shape, dtype)
        x *= 2  # in place: no temporary the size of x
        x += 3
        parameters = norm.parameter_shape(shape)
        self.x, self.dy = x, rng.standard_normal(shape, dtype)
        self.gamma = rng.uniform(0.5, 1.5, parameters).astype(dtype)
        self.beta = rng.normal(size=parameters).astype(dtype) if norm.centred else None
        self.out, self.dx = np.empty_like(x), np.empty_like(x)

    def _arguments(self):
        """fastbn's positional arguments after x (or after dy, x, stats for the backward)."""
        if self.norm.function == "group_norm":
            return (self.norm.groups,)
        if self.norm.function == "instance_norm":
            return ()
        return (self.shape[-1:],)  # normalized_shape: the last axis

    def forward(self, out=None):
        """fastbn's forward: ``(y, stats)``."""
        function = getattr(fastbn, self.norm.function)
        beta = (self.beta,) if self.norm.centred else ()
        return function(self.x, *self._arguments(), self.gamma, *beta, eps=EPS, out=out)

    def backward(self, stats, out=None):
        """fastbn's backward from the forward's ``stats``: ``(dx, dgamma[, dbeta])``."""
        function = getattr(fastbn, self.norm.function + "_backward")
        return function(self.dy, self.x, stats, *self._arguments(), self.gamma, out=out)

    def fastbn_forward(self):
        """The call to time: fastbn's forward into ``out``; returns ``(y,)``."""
        out = self.out
        return lambda: (self.forward(out)[0],)

    def fastbn_backward(self):
        """The call to time: fastbn's backward into ``dx``, given the forward's statistics
        (computed once, here)."""
        _, stats = self.forward()
        dx = self.dx
        return lambda: tuple(self.backward(stats, dx))

    def memcpy(self):
        """``np.copyto`` of x into ``out`` (one thread)."""
        x, out = self.x, self.out
        return lambda: np.copyto(out, x)

    def threaded_copy(self):
        """A copy of x into ``out`` on Numba's threads (:func:`threaded_copy`)."""
        x, out = self.x, self.out
        threaded_copy(x, out)  # compiled (or loaded from the cache) before it is timed
        return lambda: threaded_copy(x, out)


def norm_peer(case, name):
    """Peer ``name`` (one of PEERS) running ``case``'s op (a :class:`NormCase`); raises
    ``fastbn._peers.Unavailable`` with the reason where it cannot run here."""
    return _peers.make_norm(name, case, EPS)
