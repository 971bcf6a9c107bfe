"""The public functions: argument checks, device choice, and the two steps on the channel view.

Every check runs before anything is computed or written, so a call that raises leaves all of its
arguments as they were.
"""
import math
import numbers
import operator
import os
from typing import NamedTuple

import numpy as np

from . import cpu
from ._layout import ChannelView

_DATA_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class BatchStats(NamedTuple):
    """The per-channel statistics a forward pass normalized with, as ``backward`` needs them.

    Attributes
    ----------
    mean : ndarray, shape (C,), float64
        Batch mean in training, ``running_mean`` in eval.
    invstd : ndarray, shape (C,), float64
        ``1 / sqrt(var + eps)``, with the biased batch variance in training, ``running_var`` in eval.
    """

    mean: np.ndarray
    invstd: np.ndarray


def cuda_available():
    """Whether fastbn can run on a CUDA GPU here: numba.cuda is importable and finds a GPU."""
    try:
        from . import cuda as gpu
    except ImportError:
        return False
    return gpu.available()


# -- checks ------------------------------------------------------------------------------------

_DEVICES = (None, "cpu", "cuda")


def _is_cuda_array(a):
    """Whether ``a`` lives on the GPU: it exposes ``__cuda_array_interface__`` (CuPy, PyTorch,
    Numba), or it is an array of Numba's CUDA simulator, which the tests run the GPU path on."""
    if isinstance(a, np.ndarray):
        return False
    try:
        exposed = hasattr(a, "__cuda_array_interface__")
    except RuntimeError as error:  # PyTorch refuses it for a tensor that requires grad
        raise TypeError(f"a CUDA tensor that requires grad was given; pass tensor.detach() "
                        f"({error})") from None
    return exposed or type(a).__module__.startswith("numba.cuda.simulator")


def _device_view(a):
    """A zero-copy Numba device array of a CUDA array (CuPy, PyTorch, Numba, ...)."""
    if not hasattr(a, "__cuda_array_interface__"):
        return a  # the simulator's arrays are Numba's device arrays already
    from numba import cuda
    return cuda.as_cuda_array(a)


def _interface(a):
    """The array interface of a NumPy or CUDA array: data pointer, read-only flag, typestr."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__
    if hasattr(a, "__cuda_array_interface__"):
        return a.__cuda_array_interface__
    return np.asarray(a).__array_interface__  # the simulator's arrays live on the host


def _choose_device(device, *arrays):
    """``"cpu"`` or ``"cuda"``: ``device``, else FASTBN_DEVICE, else where the arrays live."""
    if device is None:
        device = os.environ.get("FASTBN_DEVICE") or None
        if device not in _DEVICES:
            raise ValueError(f"the environment variable FASTBN_DEVICE must be 'cpu' or 'cuda', "
                             f"got {device!r}")
    elif device not in _DEVICES:
        raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
    on_gpu = any(_is_cuda_array(a) for a in arrays)
    if device == "cpu" and on_gpu:
        raise TypeError("device='cpu' needs NumPy arrays, but a CUDA array was given; copy it to "
                        "the host first, or leave device=None to compute on the GPU")
    if device == "cuda" or on_gpu:
        if not cuda_available():
            raise RuntimeError(
                "fastbn was asked to compute on a CUDA GPU (device='cuda', FASTBN_DEVICE=cuda or "
                "a CUDA array), but none is usable here: it needs an NVIDIA GPU and driver and "
                "the CUDA extra, `pip install \"fastbn[cuda]\"` (numba-cuda with the CUDA "
                "bindings); fastbn.cuda_available() tells whether one is found")
        return "cuda"
    return "cpu"


def _data(name, a):
    arr = _device_view(a) if _is_cuda_array(a) else np.asarray(a)
    if arr.dtype not in _DATA_DTYPES:
        hint = ("; cast float16 data to float32 (fastbn computes in float64 either way)"
                if arr.dtype == np.float16 else "")
        raise TypeError(f"{name} must be a float32 or float64 array in native byte order, got "
                        f"dtype {arr.dtype} (shape {arr.shape}){hint}")
    return arr


def _channel_axis(axis, x):
    try:
        if isinstance(axis, (bool, np.bool_)):
            raise TypeError
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {axis!r}") from None
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (a batch axis and a channel axis), "
                         f"got shape {x.shape}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {x.shape}")
    return axis % x.ndim


def _per_channel(name, a, channels, where, gpu=False):
    """A read-only per-channel parameter (gamma, beta, ...) as float64, or None.

    ``where`` says where the channel count comes from, for the error message. With ``gpu``, a
    CUDA array is allowed and returned as a device view, unconverted.
    """
    if a is None:
        return None
    on_gpu = _is_cuda_array(a)
    arr = _device_view(a) if on_gpu else np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real-valued array, got dtype {arr.dtype} "
                        f"(shape {arr.shape})")
    _check_channels(name, arr, channels, where)
    if on_gpu and not gpu:
        raise TypeError(f"{name} is a CUDA array, but the batch is a NumPy array computed on the "
                        f"CPU; pass {name} as a NumPy array, or the batch on the GPU")
    return arr if on_gpu else arr.astype(np.float64)


def _check_channels(name, arr, channels, where):
    if arr.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), one value per channel of "
                         f"{where}, got shape {arr.shape}")


def _of_x(x, axis):
    return f"x (shape {x.shape}, channel axis {axis})"


def _running(name, a, x, axis, updated, gpu=False):
    if gpu and _is_cuda_array(a):
        view = _device_view(a)
        if view.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {view.dtype} "
                            f"(shape {view.shape})")
        _check_channels(name, view, x.shape[axis], _of_x(x, axis))
        if updated and _interface(a)["data"][1]:  # the array's own flag (views say writable)
            raise ValueError(f"{name} (shape {a.shape}) is read-only, but training updates it "
                             f"in place")
        return
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        kind = (f"dtype {a.dtype} (shape {a.shape})" if isinstance(a, np.ndarray)
                else type(a).__name__)
        raise TypeError(f"{name} must be a floating-point NumPy array, got {kind}")
    _check_channels(name, a, x.shape[axis], _of_x(x, axis))
    if updated and not a.flags.writeable:
        raise ValueError(f"{name} (shape {a.shape}) is read-only, but training updates it in place")


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _byte_range(a):
    """``[low, high)`` of the bytes a (NumPy or CUDA) array may touch, from its interface."""
    interface = _interface(a)
    shape = tuple(interface["shape"])
    itemsize = np.dtype(interface["typestr"]).itemsize
    strides = interface.get("strides") or tuple(  # None: C-contiguous
        itemsize * math.prod(shape[k + 1:]) for k in range(len(shape)))
    low = high = interface["data"][0]
    for n, stride in zip(shape, strides):
        if n == 0:
            return low, low
        if stride > 0:
            high += (n - 1) * stride
        else:
            low += (n - 1) * stride
    return low, high + itemsize


def _overlaps(a, b):
    """Whether two arrays may share memory (a problem too hard to decide counts as yes)."""
    if _is_cuda_array(a) or _is_cuda_array(b):  # device memory: by address ranges
        if _is_cuda_array(a) != _is_cuda_array(b):
            return False
        (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
        return a0 < b1 and b0 < a1
    if not np.may_share_memory(a, b):  # disjoint address ranges: cheap to tell
        return False
    try:
        return np.shares_memory(a, b, max_work=1 << 16)
    except np.exceptions.TooHardError:
        return True


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_out(out, like, **inputs):
    if out is None:
        return
    if _is_cuda_array(like):
        if not _is_cuda_array(out):
            raise TypeError(f"out must be a CUDA array like x, got {type(out).__name__}")
        view = _device_view(out)
        if view.shape == like.shape and not view.is_c_contiguous():
            raise ValueError(f"out (shape {view.shape}, strides {view.strides}) must be "
                             f"C-contiguous on the GPU")
        if _interface(out)["data"][1]:  # the array's own flag (views say writable)
            raise ValueError(f"out is read-only (shape {view.shape})")
        out = view
    elif not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.dtype != like.dtype:
        raise TypeError(f"out must have x's dtype {like.dtype}, got {out.dtype} "
                        f"(shapes: out {out.shape}, x {like.shape})")
    if out.shape != like.shape:
        raise ValueError(f"out must have x's shape {like.shape}, got {out.shape}")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"out is read-only (shape {out.shape})")
    for name, a in inputs.items():
        same = lambda: _byte_range(out) == _byte_range(a) and out.strides == a.strides  # noqa: E731
        # (``out`` and the inputs here are NumPy arrays or Numba device views, with .strides)
        if _overlaps(out, a) and not same():
            raise ValueError(f"out (shape {out.shape}, strides {out.strides}) partly overlaps "
                             f"{name} (strides {a.strides}); it may be {name} itself, or separate")


def _eps(eps):
    eps = _real("eps", eps)
    if not eps > 0 or math.isinf(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return eps


def _values_per_channel(x, axis):
    return math.prod(n for k, n in enumerate(x.shape) if k != axis)


# -- forward and backward ----------------------------------------------------------------------


class _Forward(NamedTuple):
    """A forward call whose arguments passed every check: converted, and where it runs."""

    gpu: bool
    x: object
    axis: int
    training: bool
    gamma: object
    beta: object
    running_mean: object
    running_var: object
    momentum: float
    eps: float
    out: object


def _too_few_values(count, x, axis, what="x"):
    return ValueError(f"training needs more than one value per channel, but {what} of shape "
                      f"{x.shape} has {count} per channel (channel axis {axis})")


def _check_forward(x, gamma, beta, axis, training, running_mean, running_var, momentum, eps, out,
                   device, own_statistics=True):
    """Every check of a forward call, before anything is computed or written.

    ``own_statistics=False``: the statistics come from a larger batch that x is part of
    (``normalize``, ``fastbn.distributed``), so x itself may hold fewer than two values per
    channel; the caller checks the batch's count.
    """
    gpu = _choose_device(device, x, out) == "cuda"
    x = _data("x", x)
    axis = _channel_axis(axis, x)
    training = _flag("training", training)
    channels = x.shape[axis]
    gamma = _per_channel("gamma", gamma, channels, _of_x(x, axis), gpu)
    beta = _per_channel("beta", beta, channels, _of_x(x, axis), gpu)
    eps = _eps(eps)
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"running_mean and running_var go together: pass both or neither (only "
                         f"{given} was given)")
    momentum = _real("momentum", momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
    count = _values_per_channel(x, axis)
    if training:
        if own_statistics and count < 2:
            raise _too_few_values(count, x, axis)
    elif running_mean is None:
        raise ValueError(f"training=False normalizes with running_mean and running_var, which "
                         f"were not given (x of shape {x.shape})")
    if running_mean is not None:
        _running("running_mean", running_mean, x, axis, training, gpu)
        _running("running_var", running_var, x, axis, training, gpu)
        if _is_cuda_array(running_mean) != _is_cuda_array(running_var):
            raise TypeError("running_mean and running_var must live in the same place: both "
                            "CUDA arrays or both NumPy arrays")
    _check_out(out, x, x=x)
    if gpu:
        _check_gpu_contiguous("x", x)
    if training and running_mean is not None:
        # Written in place after y: they must not share memory with what else is read or written.
        pairs = [("running_mean", running_mean, "running_var", running_var)]
        pairs += [(name, stat, other, a) for name, stat in (("running_mean", running_mean),
                                                             ("running_var", running_var))
                  for other, a in (("x", x), ("out", out)) if a is not None]
        for name, stat, other, a in pairs:
            if _overlaps(stat, a):
                raise ValueError(f"{name} shares memory with {other}")
    return _Forward(gpu, x, axis, training, gamma, beta, running_mean, running_var, momentum, eps,
                    out)


def forward(x, gamma=None, beta=None, *, axis=1, training=True, running_mean=None,
            running_var=None, momentum=0.1, eps=1e-5, out=None, device=None):
    """Batch normalization of ``x`` over every axis but the channel ``axis``.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
        The batch. Any layout: N×D and N×C×H×W with ``axis=1``, N×H×W×C with ``axis=-1``, ...
    gamma, beta : array_like, shape (C,), optional
        Scale and shift; ``None`` means 1 and 0.
    axis : int
        The channel axis.
    training : bool
        True: normalize with the batch mean and biased batch variance, and update
        ``running_mean``/``running_var`` in place if given (PyTorch's convention, unbiased variance).
        False: normalize with ``running_mean``/``running_var``, which are required and not modified.
    running_mean, running_var : ndarray, shape (C,), optional
        Floating-point arrays, both or neither; updated in their own dtype.
    momentum : float in [0, 1]
        ``running = (1 - momentum) * running + momentum * batch``.
    eps : float > 0
        Added to the variance.
    out : ndarray, optional
        Where to write y: x's shape and dtype; may be ``x`` itself.
    device : {None, "cpu", "cuda"}
        None picks by where x lives.

    Returns
    -------
    y : ndarray
        x's shape and dtype (``out`` if given).
    stats : BatchStats
        The float64 ``(mean, invstd)`` used, for ``backward``.
    """
    return _forward(_check_forward(x, gamma, beta, axis, training, running_mean, running_var,
                                   momentum, eps, out, device))


def _forward(call):
    """Run a checked forward call."""
    if not call.training:
        return _normalize_with(call, call.running_mean, call.running_var)
    if call.gpu:
        return _cuda_forward(call)
    x, axis = call.x, call.axis
    view = ChannelView(x, axis)
    x3 = view.of(x)
    y, y3, pending = view.output(call.out, x.dtype)
    channels, count = x.shape[axis], _values_per_channel(x, axis)
    gamma = np.ones(channels) if call.gamma is None else call.gamma
    beta = np.zeros(channels) if call.beta is None else call.beta
    if x3.size:
        # Statistics of x − s, s one value of each channel: a large offset never enters a sum.
        # The map is centred about s too, which lies within the data:
        # a·(x − μ) + β = a·(x − s) + (β − a·δ); the folded a·x + (β − a·μ) would lose digits
        # when |μ| ≫ σ.
        shift = x3[0, :, 0].astype(np.float64)
        delta, m2, invstd = cpu.normalize(x3, y3, shift, gamma, beta, call.eps)
        mean, var = shift + delta, m2 / count
    else:  # no channels
        mean = var = invstd = np.zeros(0)
    if pending is not None:
        y[...] = pending
    if call.running_mean is not None:
        _update_running(call, mean, var, count / (count - 1))
    return y, BatchStats(mean, invstd)


def _normalize_with(call, mean, var, unbiased_var=None):
    """y of a checked call normalized with the given ``mean`` and biased ``var``, and the running
    statistics updated with ``unbiased_var`` if given (host or device arrays, shape (C,))."""
    if call.gpu:
        y, stats = _cuda_normalize_with(call, mean, var)
    else:
        x, axis = call.x, call.axis
        channels = x.shape[axis]
        mean = np.array(mean, np.float64)  # a copy: stats must not alias running_mean
        invstd = 1.0 / np.sqrt(np.asarray(var, np.float64) + call.eps)
        view = ChannelView(x, axis)
        x3 = view.of(x)
        y, y3, pending = view.output(call.out, x.dtype)
        if x3.size:
            scale = invstd if call.gamma is None else call.gamma * invstd
            cpu.affine(x3, y3, mean, scale, np.zeros(channels) if call.beta is None else call.beta)
        if pending is not None:
            y[...] = pending
        stats = BatchStats(mean, invstd)
    if call.training and call.running_mean is not None:
        _update_running(call, mean, unbiased_var, 1.0)
    return y, stats


def _update_running(call, mean, var, unbias):
    """``running = (1 − momentum)·running + momentum·batch``, with the unbiased ``var·unbias``,
    where the running statistics live (host or device)."""
    momentum = call.momentum
    if _is_cuda_array(call.running_mean):
        from . import cuda as gpu
        channels = call.x.shape[call.axis]
        # batch statistics from the GPU are float64 device arrays already: no copy on that path
        mean, var = (a if _is_cuda_array(a) else gpu.per_channel(a, channels) for a in (mean, var))
        gpu.update_running(_device_view(call.running_mean), _device_view(call.running_var),
                           mean, var, momentum, unbias)
        return
    mean, var = (a.copy_to_host() if _is_cuda_array(a) else a for a in (mean, var))
    call.running_mean[...] = (1.0 - momentum) * call.running_mean + momentum * mean
    call.running_var[...] = (1.0 - momentum) * call.running_var + momentum * var * unbias


class _Backward(NamedTuple):
    """A backward call whose arguments passed every check."""

    gpu: bool
    dy: object
    x: object
    axis: int
    training: bool
    mean: object
    invstd: object
    gamma: object
    grad_dtype: np.dtype
    out: object


def _check_backward(dy, x, stats, gamma, axis, training, out, device):
    """Every check of a backward call, before anything is computed or written."""
    gpu = _choose_device(device, dy, x, out) == "cuda"
    x = _data("x", x)
    dy = _data("dy", dy)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype} (shape {dy.shape})")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {x.shape}, got {dy.shape}")
    axis = _channel_axis(axis, x)
    training = _flag("training", training)
    try:
        mean, invstd = stats
    except (TypeError, ValueError):
        raise TypeError("stats must be the BatchStats (mean, invstd) that forward returned, got "
                        f"{type(stats).__name__}") from None
    channels, where = x.shape[axis], _of_x(x, axis)
    mean = _per_channel("stats.mean", mean, channels, where, gpu)
    invstd = _per_channel("stats.invstd", invstd, channels, where, gpu)
    grad_dtype = x.dtype
    if gamma is not None:
        gamma_dtype = _device_view(gamma).dtype if _is_cuda_array(gamma) else np.asarray(gamma).dtype
        grad_dtype = gamma_dtype if gamma_dtype.kind == "f" else x.dtype
    gamma = _per_channel("gamma", gamma, channels, where, gpu)
    _check_out(out, x, x=x, dy=dy)
    if gpu:
        _check_gpu_contiguous("x", x)
        _check_gpu_contiguous("dy", dy)
    if gpu and grad_dtype not in _DATA_DTYPES:
        raise TypeError(f"on the GPU, gamma must be float32 or float64 (dgamma and dbeta take its "
                        f"dtype), got {grad_dtype}")
    return _Backward(gpu, dy, x, axis, training, mean, invstd, gamma, grad_dtype, out)


def backward(dy, x, stats, gamma=None, *, axis=1, training=True, out=None, device=None):
    """Gradients of batch normalization: ``dx, dgamma, dbeta`` from ``dy = ∂loss/∂y``.

    Parameters
    ----------
    dy : ndarray
        Gradient with respect to y: x's shape and dtype.
    x : ndarray
        The forward pass's input.
    stats : BatchStats or (mean, invstd)
        What the forward pass returned.
    gamma : array_like, shape (C,), optional
        The forward pass's scale; ``None`` means 1.
    axis : int
        The channel axis.
    training : bool
        True: the gradient flows through the batch statistics,
        ``dx = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂))``. False: they are constants,
        ``dx = γ·invstd·dy``.
    out : ndarray, optional
        Where to write dx: x's shape and dtype; may be ``dy`` or ``x`` itself.
    device : {None, "cpu", "cuda"}
        None picks by where the arrays live.

    Returns
    -------
    dx : ndarray
        x's shape and dtype (``out`` if given).
    dgamma, dbeta : ndarray, shape (C,)
        ``Σ dy·x̂`` and ``Σ dy``, in gamma's dtype (x's if gamma is None or not floating).
    """
    return _backward(_check_backward(dy, x, stats, gamma, axis, training, out, device))


def _backward(call, add=None):
    """Run a checked backward call.

    ``add``, given for a batch spread over processes (fastbn.distributed), takes x's float64
    ``(Σdy, Σdy·(x − μ), count)`` and returns the whole batch's. dgamma and dbeta are x's share.
    """
    if call.gpu:
        return _cuda_backward(call, add)
    x, axis = call.x, call.axis
    channels, count = x.shape[axis], _values_per_channel(x, axis)
    view = ChannelView(x, axis)
    x3, dy3 = view.of(x), view.of(call.dy)
    dx, dx3, pending = view.output(call.out, x.dtype)
    sums = (cpu.gradient_sums(dy3, x3, call.mean) if x3.size else
            (np.zeros(channels), np.zeros(channels)))
    total = (*sums, count) if add is None else add(*sums, count)
    if x3.size:
        gamma = np.ones(channels) if call.gamma is None else call.gamma
        cpu.backward_map(dy3, x3, dx3, call.mean, call.invstd, gamma, *total, call.training)
    if pending is not None:
        dx[...] = pending
    sum_dy, sum_dy_xmu = sums
    return dx, (sum_dy_xmu * call.invstd).astype(call.grad_dtype), sum_dy.astype(call.grad_dtype)


# -- mergeable statistics ----------------------------------------------------------------------


class Moments(NamedTuple):
    """Per-channel ``(count, mean, M2)`` of a batch: what two disjoint batches merge exactly.

    Attributes
    ----------
    count : ndarray, shape (C,), float64
        Values per channel.
    mean : ndarray, shape (C,), float64
        Their mean (0 where count is 0).
    m2 : ndarray, shape (C,), float64
        Their sum of squared deviations from the mean, ``Σ(x − mean)²``: the biased variance is
        ``m2 / count``, the unbiased one ``m2 / (count − 1)``.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray


def _batch_moments(x, axis, gpu):
    channels, count = x.shape[axis], _values_per_channel(x, axis)
    if count == 0 or channels == 0:
        mean, m2 = np.zeros(channels), np.zeros(channels)
    elif gpu:
        from . import cuda as gpu_module
        x3 = _to_gpu("x", x).reshape(_view_shape(x.shape, axis))
        mean, m2 = gpu_module.batch_moments(x3)
    else:
        mean, m2 = cpu.moments(ChannelView(x, axis).of(x))
    return Moments(np.full(channels, float(count)), mean, m2)


def moments(x, *, axis=1, device=None):
    """Per-channel ``Moments(count, mean, M2)`` of the batch ``x``, in one pass over it.

    Moments of disjoint batches merge exactly with ``merge_moments``: the statistics of data that
    does not fit in memory, chunk by chunk, or of a batch spread over processes.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
        The batch (a CUDA array is read on the GPU); it may be empty.
    axis : int
        The channel axis.
    device : {None, "cpu", "cuda"}
        None picks by where x lives.

    Returns
    -------
    Moments
        float64 NumPy arrays of shape (C,), wherever x lives (3·C numbers, to merge or send).
    """
    gpu = _choose_device(device, x) == "cuda"
    x = _data("x", x)
    return _batch_moments(x, _channel_axis(axis, x), gpu)


def _as_moments(name, moments_, channels=None, where=""):
    """A checked ``Moments`` of float64 host arrays, all of one shape (C,)."""
    try:
        count, mean, m2 = moments_
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a Moments (count, mean, m2), got "
                        f"{type(moments_).__name__}") from None
    if channels is None:
        if np.ndim(mean) != 1:
            raise ValueError(f"{name}.mean must be 1-D, one value per channel, got shape "
                             f"{np.shape(mean)}")
        channels = np.shape(mean)[0]
        where = f"{name}.mean (shape {np.shape(mean)})"
    parts = [_per_channel(f"{name}.{field}", a, channels, where)
             for field, a in zip(Moments._fields, (count, mean, m2))]
    if parts[0] is None or parts[1] is None or parts[2] is None:
        raise TypeError(f"{name} must hold three arrays (count, mean, m2), got None")
    if not (np.isfinite(parts[0]).all() and (parts[0] >= 0).all()):
        raise ValueError(f"{name}: count must be finite and >= 0, got {parts[0]}")
    if (parts[2] < 0).any():  # NaN passes: a NaN in the data spoils its channel, as in forward
        raise ValueError(f"{name}: m2 must be >= 0")
    return Moments(*parts)


def merge_moments(*parts):
    """The ``Moments`` of the union of disjoint batches, from each batch's.

    Chan et al.'s pairwise formula in float64, applied in the order given (so the result is the
    same bits wherever the same parts are merged in the same order). Empty parts (count 0) change
    nothing.

    Parameters
    ----------
    *parts : Moments
        One per batch, all with the same channels.

    Returns
    -------
    Moments
    """
    if not parts:
        raise TypeError("merge_moments needs at least one Moments")
    first = _as_moments("parts[0]", parts[0])
    where = f"parts[0].mean (shape {first.mean.shape})"
    return _merge([first] + [_as_moments(f"parts[{k}]", part, first.mean.shape[0], where)
                             for k, part in enumerate(parts[1:], 1)])


def _merge(parts):
    """merge_moments of checked parts."""
    count, mean, m2 = (np.array(a, np.float64) for a in parts[0])
    for n_b, mean_b, m2_b in parts[1:]:
        total = count + n_b
        share = np.divide(n_b, total, out=np.zeros_like(total), where=total > 0)
        delta = mean_b - mean
        m2 = m2 + m2_b + delta * delta * count * share
        mean = np.where(count == 0, mean_b, mean + delta * share)
        count = total
    return Moments(count, mean, m2)


def _variances(total):
    """``(mean, biased variance, unbiased variance)`` of merged ``Moments``."""
    return total.mean, total.m2 / total.count, total.m2 / (total.count - 1)


def normalize(x, moments, gamma=None, beta=None, *, axis=1, running_mean=None, running_var=None,
              momentum=0.1, eps=1e-5, out=None, device=None):
    """Training-mode batch norm of ``x`` with the statistics of a batch that x is part of.

    ``y = γ·(x − mean)/sqrt(m2/count + eps) + β`` with ``moments`` (from ``moments`` and
    ``merge_moments``), and the running statistics updated as ``forward`` does, with that batch's
    unbiased variance ``m2/(count − 1)``: once per call, so when a batch is normalized chunk by
    chunk, pass them with one chunk's call only.

    Parameters
    ----------
    x : ndarray
        As for ``forward``; it may hold any number of values per channel, none included.
    moments : Moments
        Of the whole batch: more than one value per channel.
    gamma, beta, axis, running_mean, running_var, momentum, eps, out, device
        As for ``forward``.

    Returns
    -------
    y : ndarray
    stats : BatchStats
        The mean and invstd used.
    """
    call = _check_forward(x, gamma, beta, axis, True, running_mean, running_var, momentum, eps,
                          out, device, own_statistics=False)
    channels = call.x.shape[call.axis]
    total = _as_moments("moments", moments, channels, _of_x(call.x, call.axis))
    if channels and total.count.min() < 2:
        raise ValueError(f"training needs more than one value per channel, but moments.count is "
                         f"{total.count.min():g} for some channel")
    return _normalize_with(call, *_variances(total))


# -- the GPU path -------------------------------------------------------------------------------


def _view_shape(shape, axis):
    """``(outer, C, inner)`` of a C-contiguous array of ``shape`` with channel ``axis``."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _check_gpu_contiguous(name, a):
    """A CUDA array read on the GPU must be C-contiguous (a NumPy one is copied in contiguous)."""
    if not isinstance(a, np.ndarray) and not a.is_c_contiguous():
        raise ValueError(f"{name} (shape {a.shape}, strides {a.strides}) must be C-contiguous on "
                         f"the GPU; make a contiguous copy first")


def _to_gpu(name, a):
    """A C-contiguous device array of ``a``: a host array is copied in, a device one viewed."""
    from numba import cuda
    _check_gpu_contiguous(name, a)
    if isinstance(a, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(a))
    return a


def _gpu_result(out, x, on_host):
    """Where a GPU op writes its result of x's shape: ``out`` itself if it is a CUDA array."""
    from numba import cuda
    if out is not None and not on_host:
        return _device_view(out)
    return cuda.device_array(x.shape, x.dtype)


def _finish_on_gpu(result, out, on_host, *per_channel):
    """The op's result: on the host (into ``out`` if given) for NumPy input, else the device
    array (``out`` if given); then the per-channel arrays, copied to the host for NumPy input."""
    if on_host:
        if out is None:
            host = result.copy_to_host()
        else:
            out[...] = result.copy_to_host()
            host = out
        return (host, *(a.copy_to_host() for a in per_channel))
    return (result if out is None else out, *per_channel)


def _gpu_views(call, *names):
    """``(on_host, (outer, C, inner), device views of the named arrays, result array)``."""
    on_host = isinstance(call.x, np.ndarray)  # device="cuda" with NumPy arrays: copy in and back
    shape3 = _view_shape(call.x.shape, call.axis)
    views = [_to_gpu(name, getattr(call, name)).reshape(shape3) for name in names]
    result = _gpu_result(call.out, call.x, on_host)
    return on_host, shape3, views, result


def _cuda_forward(call):
    """Training forward on the GPU, with x's own statistics."""
    from . import cuda as gpu
    on_host, shape3, (x3,), yd = _gpu_views(call, "x")
    channels = shape3[1]
    if call.x.size:
        mean, var, invstd = gpu.normalize(x3, yd.reshape(shape3),
                                          gpu.per_channel(call.gamma, channels, 1.0),
                                          gpu.per_channel(call.beta, channels, 0.0), call.eps)
    else:
        mean = var = invstd = gpu.per_channel(np.zeros(0), 0)
    if call.running_mean is not None:
        count = shape3[0] * shape3[2]
        _update_running(call, mean, var, count / (count - 1))
    y, mean, invstd = _finish_on_gpu(yd, call.out, on_host, mean, invstd)
    return y, BatchStats(mean, invstd)


def _cuda_normalize_with(call, mean, var):
    """Forward on the GPU with the given statistics (host or device arrays)."""
    from . import cuda as gpu
    on_host, shape3, (x3,), yd = _gpu_views(call, "x")
    channels = shape3[1]
    mean, var = gpu.per_channel(mean, channels), gpu.per_channel(var, channels)
    invstd = gpu.normalize_eval(x3, yd.reshape(shape3), mean, var,
                                gpu.per_channel(call.gamma, channels, 1.0),
                                gpu.per_channel(call.beta, channels, 0.0), call.eps)
    y, mean, invstd = _finish_on_gpu(yd, call.out, on_host, mean, invstd)
    return y, BatchStats(mean, invstd)


def _cuda_backward(call, add):
    from numba import cuda
    from . import cuda as gpu
    on_host, shape3, (x3, dy3), dxd = _gpu_views(call, "x", "dy")
    channels = shape3[1]
    mean = gpu.per_channel(call.mean, channels)
    invstd = gpu.per_channel(call.invstd, channels)
    count = shape3[0] * shape3[2]
    if call.x.size:
        sum_dy, sum_dy_xmu = gpu.grad_sums(dy3, x3, mean)
    else:
        sum_dy = sum_dy_xmu = cuda.to_device(np.zeros(channels))
    if add is None:
        total = sum_dy, sum_dy_xmu, count
    else:
        total_dy, total_dy_xmu, count = add(sum_dy.copy_to_host(), sum_dy_xmu.copy_to_host(), count)
        total = cuda.to_device(total_dy), cuda.to_device(total_dy_xmu), count
    if call.x.size:
        gpu.backward_map(dy3, x3, dxd.reshape(shape3), mean, invstd,
                         gpu.per_channel(call.gamma, channels, 1.0), *total, call.training)
    dgamma = gpu.product(sum_dy_xmu, invstd, call.grad_dtype)
    dbeta = gpu.cast(sum_dy, call.grad_dtype)
    return _finish_on_gpu(dxd, call.out, on_host, dgamma, dbeta)


# -- eval-mode batch norm as one multiply-add --------------------------------------------------


def _affine64(gamma, beta, running_mean, running_var, eps):
    """float64 ``(scale, shift)`` of eval-mode BN, and the floating dtype of the inputs."""
    given = {"gamma": gamma, "beta": beta, "running_mean": running_mean,
             "running_var": running_var}
    floats = [np.asarray(a).dtype for a in given.values()
              if a is not None and np.asarray(a).dtype.kind == "f"]
    for name in ("running_mean", "running_var"):
        if given[name] is None:
            raise TypeError(f"{name} must be an array of shape (C,), got None")
    shape = np.shape(running_mean)
    if len(shape) != 1:
        raise ValueError(f"running_mean must be 1-D, one value per channel, got shape {shape}")
    where = f"running_mean (shape {shape})"
    gamma, beta, mean, var = (_per_channel(name, a, shape[0], where) for name, a in given.items())
    eps = _eps(eps)
    scale = 1.0 / np.sqrt(var + eps)
    if gamma is not None:
        scale = gamma * scale
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta
    return scale, shift, np.result_type(*floats) if floats else np.dtype(np.float64)


def inference_affine(gamma, beta, running_mean, running_var, eps=1e-5):
    """Eval-mode batch norm as one multiply-add per channel: ``y = scale·x + shift``.

    Parameters
    ----------
    gamma, beta : array_like, shape (C,), or None
        Scale and shift of the BN layer (None: 1 and 0).
    running_mean, running_var : array_like, shape (C,)
        Its running statistics.
    eps : float
        Added to the variance.

    Returns
    -------
    scale, shift : ndarray, shape (C,)
        ``scale = γ/sqrt(var + eps)``, ``shift = β − mean·scale``, in the inputs' floating dtype.
        This folded form loses digits when |mean| ≫ std; ``forward(training=False)`` does not.
    """
    scale, shift, dtype = _affine64(gamma, beta, running_mean, running_var, eps)
    return scale.astype(dtype), shift.astype(dtype)


def fold(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
    """Fold an eval-mode BN into the Linear or Conv layer before it.

    Parameters
    ----------
    weight : ndarray, shape (C, ...)
        The layer's weight, output channels on axis 0 (PyTorch's layout: Linear ``(out, in)``,
        Conv2d ``(out, in, kh, kw)``).
    bias : ndarray, shape (C,), or None
        The layer's bias.
    gamma, beta, running_mean, running_var, eps
        The BN layer, as for ``inference_affine``.

    Returns
    -------
    weight, bias : ndarray
        New arrays, in weight's dtype, such that the layer with them equals layer-then-BN.
    """
    weight = np.asarray(weight)
    if weight.dtype.kind != "f":
        raise TypeError(f"weight must be a floating-point array, got dtype {weight.dtype}")
    scale, shift, _ = _affine64(gamma, beta, running_mean, running_var, eps)
    if weight.ndim < 1 or weight.shape[0] != scale.shape[0]:
        raise ValueError(f"weight's axis 0 must hold the {scale.shape[0]} output channels of the BN "
                         f"layer, got weight of shape {weight.shape}")
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype.kind not in "fiu":
            raise TypeError(f"bias must be a real-valued array, got dtype {bias.dtype}")
        if bias.shape != scale.shape:
            raise ValueError(f"bias must have shape {scale.shape}, got {bias.shape}")
        shift = shift + bias.astype(np.float64) * scale
    folded = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return folded.astype(weight.dtype), shift.astype(weight.dtype)
