"""Argument checks and the device choice, run before anything is computed or written.

A call that raises leaves all of its arguments as they were. Each kind of error has one message,
made here; it names the argument and the shapes. ``check_forward`` and ``check_backward`` return
the checked call: its arguments converted, and the device module (``fastbn.cpu`` or
``fastbn.cuda``) that runs it. ``lean_forward`` and ``lean_backward`` recognize the common call
in a handful of operations, and only accept: any doubt leaves the call to the full checks.
"""
import math
import numbers
import operator
import os
from typing import NamedTuple

import numpy as np

from . import _outputs, cpu
from ._arrays import (
    byte_range,
    call_steps,
    device_view,
    is_cuda_array,
    is_read_only,
    overlaps,
)

DATA_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_DEVICES = (None, "cpu", "cuda")


def cuda_available():
    """Whether fastbn can run on a CUDA GPU here: numba.cuda is importable and finds a GPU."""
    try:
        from . import cuda
    except ImportError:
        return False
    return cuda.available()


def choose_device(device, *arrays):
    """The device module of a call: ``device``, else FASTBN_DEVICE, else where the arrays live."""
    if device is None:
        device = os.environ.get("FASTBN_DEVICE") or None
        if device not in _DEVICES:
            raise ValueError(f"the environment variable FASTBN_DEVICE must be 'cpu' or 'cuda', "
                             f"got {device!r}")
    elif device not in _DEVICES:
        raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
    on_gpu = any(is_cuda_array(a) for a in arrays)
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
        from . import cuda  # only now: import fastbn never needs CUDA
        return cuda
    return cpu


def where_lives(a):
    """The device module that holds ``a`` (a NumPy or CUDA array)."""
    if is_cuda_array(a):
        from . import cuda
        return cuda
    return cpu


# -- single arguments ---------------------------------------------------------------------------


def data(name, a):
    """x or dy: a float32 or float64 NumPy array, or a device view of a CUDA one."""
    arr = device_view(a, name) if is_cuda_array(a) else np.asarray(a)
    if arr.dtype not in DATA_DTYPES:
        hint = ""
        if arr.dtype == np.float16:
            hint = "; cast float16 data to float32 (fastbn computes in float64 either way)"
        elif arr.dtype.kind in "iubf":  # integers, bools, other floats: a cast fixes them
            target = "np.float32" if name == "x" else "x.dtype"  # dy, residual: x's dtype
            hint = f"; cast it to float32 or float64 first ({name}.astype({target}))"
        raise TypeError(f"{name} must be a float32 or float64 array in native byte order, got "
                        f"dtype {arr.dtype} (shape {arr.shape}){hint}")
    return arr


def channel_axis(axis, x):
    """``axis`` as an index in ``[0, x.ndim)``."""
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


def of_x(x, axis):
    """How error messages name x's channels."""
    return f"x (shape {x.shape}, channel axis {axis})"


def check_channels(name, arr, channels, where):
    if arr.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), one value per channel of "
                         f"{where}, got shape {arr.shape}")


def per_channel(name, a, channels, where, allow_cuda=False):
    """A read-only per-channel parameter (gamma, beta, ...) as float64, or None.

    ``where`` says where the channel count comes from, for the error message. With
    ``allow_cuda``, a CUDA array is allowed and returned as a device view, unconverted.
    """
    if a is None:
        return None
    on_gpu = is_cuda_array(a)
    arr = device_view(a, name) if on_gpu else np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real-valued array, got dtype {arr.dtype} "
                        f"(shape {arr.shape})")
    check_channels(name, arr, channels, where)
    if on_gpu and not allow_cuda:
        raise TypeError(f"{name} is a CUDA array, but the batch is a NumPy array computed on the "
                        f"CPU; pass {name} as a NumPy array, or the batch on the GPU")
    return arr if on_gpu else arr.astype(np.float64)


def running(name, a, x, axis, updated, allow_cuda=False):
    """Check running_mean or running_var (updated in place when ``updated``)."""
    if allow_cuda and is_cuda_array(a):
        arr = device_view(a, name)
        if arr.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype} "
                            f"(shape {arr.shape})")
    elif not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        kind = (f"dtype {a.dtype} (shape {a.shape})" if isinstance(a, np.ndarray)
                else type(a).__name__)
        raise TypeError(f"{name} must be a floating-point NumPy array, got {kind}")
    else:
        arr = a
    check_channels(name, arr, x.shape[axis], of_x(x, axis))
    if updated and is_read_only(a):
        raise ValueError(f"{name} (shape {arr.shape}) is read-only, but training updates it in "
                         f"place")


def flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def eps_value(eps):
    eps = real("eps", eps)
    if not eps > 0 or math.isinf(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return eps


def momentum_value(momentum):
    momentum = real("momentum", momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
    return momentum


def values_per_channel(x, axis):
    return math.prod(n for k, n in enumerate(x.shape) if k != axis)


def too_few_values(count, batch, detail=""):
    """The error of training on one value per channel (or none); ``batch`` names the batch."""
    return ValueError(f"training needs more than one value per channel, but {batch} has "
                      f"{count:g} per channel{detail}")


def gpu_contiguous(name, a):
    """A CUDA array read on the GPU must be C-contiguous (a NumPy one is copied in contiguous)."""
    if not isinstance(a, np.ndarray) and not a.is_c_contiguous():
        raise ValueError(f"{name} (shape {a.shape}, strides {a.strides}) must be C-contiguous on "
                         f"the GPU; make a contiguous copy first")


def gradient_of(name, a, x):
    """dy: a data array of x's dtype and shape."""
    arr = data(name, a)
    if arr.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {arr.dtype} "
                        f"(shape {arr.shape})")
    if arr.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {x.shape}, got {arr.shape}")
    return arr


def gradient_dtype(gamma, x):
    """The dtype of dgamma and dbeta: gamma's if it is floating, else x's (float32 or float64 on
    the GPU)."""
    dtype = x.dtype
    if gamma is not None:
        gamma_dtype = device_view(gamma).dtype if is_cuda_array(gamma) else np.asarray(gamma).dtype
        dtype = gamma_dtype if gamma_dtype.kind == "f" else x.dtype
    return dtype


def gpu_gradient_dtype(dtype):
    """On the GPU, dgamma and dbeta must be float32 or float64."""
    if dtype not in DATA_DTYPES:
        raise TypeError(f"on the GPU, gamma must be float32 or float64 (dgamma and dbeta take "
                        f"its dtype), got {dtype}")


ACTIVATIONS = (None, "relu")


def activation_value(activation):
    """``activation`` checked: whether it is ReLU."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None or 'relu', got {activation!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def like_x(name, a, x):
    """An input read like x (residual, y): x's dtype, shape and device, C-contiguous on the GPU."""
    if is_cuda_array(a) != is_cuda_array(x):
        where = "a CUDA array" if is_cuda_array(x) else "a NumPy array"
        raise TypeError(f"{name} must live where x does ({where}), got {type(a).__name__}")
    arr = data(name, a)
    if arr.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {arr.dtype} "
                        f"(shape {arr.shape})")
    if arr.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {x.shape}, got {arr.shape}")
    if not isinstance(arr, np.ndarray):
        gpu_contiguous(name, arr)
    return arr


def check_out(out, like, name="out", **inputs):
    """``out``: x's shape and dtype, writable, where x lives, and either one of ``inputs`` itself
    or apart from them."""
    if out is None:
        return
    if is_cuda_array(like):
        if not is_cuda_array(out):
            raise TypeError(f"{name} must be a CUDA array like x, got {type(out).__name__}")
        view = device_view(out, name)
        if view.shape == like.shape and not view.is_c_contiguous():
            raise ValueError(f"{name} (shape {view.shape}, strides {view.strides}) must be "
                             f"C-contiguous on the GPU")
        if is_read_only(out):
            raise ValueError(f"{name} is read-only (shape {view.shape})")
        out = view
    elif not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    if out.dtype != like.dtype:
        raise TypeError(f"{name} must have x's dtype {like.dtype}, got {out.dtype} "
                        f"(shapes: {name} {out.shape}, x {like.shape})")
    if out.shape != like.shape:
        raise ValueError(f"{name} must have x's shape {like.shape}, got {out.shape}")
    if isinstance(out, np.ndarray) and is_read_only(out):  # a CUDA out: checked above
        raise ValueError(f"{name} is read-only (shape {out.shape})")
    for other, a in inputs.items():
        if a is None:
            continue
        same = lambda: byte_range(out) == byte_range(a) and out.strides == a.strides  # noqa: E731
        # (``out`` and the inputs here are NumPy arrays or Numba device views, with .strides)
        if overlaps(out, a) and not same():
            raise ValueError(f"{name} (shape {out.shape}, strides {out.strides}) partly "
                             f"overlaps {other} (strides {a.strides}); it may be {other} "
                             f"itself, or separate")


# -- whole calls --------------------------------------------------------------------------------


class Forward(NamedTuple):
    """A forward call whose arguments passed every check: converted, and where it runs."""

    device: object  # what computes: fastbn.cpu, or fastbn.cuda's steps on the call's stream
    x: object
    axis: int
    training: bool
    gamma: object
    beta: object
    running_mean: object
    running_var: object
    running_device: object  # the module that holds the running statistics, or None
    momentum: float
    eps: float
    out: object
    residual: object = None  # added to BN(x) before the activation
    relu: bool = False


def check_forward(x, gamma, beta, axis, training, running_mean, running_var, momentum, eps, out,
                  device, own_statistics=True, stream=None, residual=None, activation=None):
    """Every check of a forward call, before anything is computed or written.

    ``own_statistics=False``: the statistics come from a larger batch that x is part of
    (``normalize``, ``fastbn.distributed``), so x itself may hold fewer than two values per
    channel; the caller checks the batch's count. ``stream``: the GPU stream to run on.
    """
    device = choose_device(device, x, out, residual)
    on_gpu = device.NAME == "cuda"
    x = data("x", x)
    axis = channel_axis(axis, x)
    training = flag("training", training)
    channels, where = x.shape[axis], of_x(x, axis)
    gamma = per_channel("gamma", gamma, channels, where, on_gpu)
    beta = per_channel("beta", beta, channels, where, on_gpu)
    eps = eps_value(eps)
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"running_mean and running_var go together: pass both or neither (only "
                         f"{given} was given)")
    momentum = momentum_value(momentum)
    count = values_per_channel(x, axis)
    if training:
        if own_statistics and count < 2:
            raise too_few_values(count, f"x of shape {x.shape}", f" (channel axis {axis})")
    elif running_mean is None:
        raise ValueError(f"training=False normalizes with running_mean and running_var, which "
                         f"were not given (x of shape {x.shape})")
    running_device = None
    if running_mean is not None:
        running("running_mean", running_mean, x, axis, training, on_gpu)
        running("running_var", running_var, x, axis, training, on_gpu)
        if is_cuda_array(running_mean) != is_cuda_array(running_var):
            raise TypeError("running_mean and running_var must live in the same place: both "
                            "CUDA arrays or both NumPy arrays")
        running_device = where_lives(running_mean)
    relu = activation_value(activation)
    if residual is not None:
        residual = like_x("residual", residual, x)
    check_out(out, x, x=x, residual=residual)
    if on_gpu:
        gpu_contiguous("x", x)
    if training and running_mean is not None:
        # Written in place after y: they must not share memory with what else is read or written.
        pairs = [("running_mean", running_mean, "running_var", running_var)]
        pairs += [(name, stat, other, a) for name, stat in (("running_mean", running_mean),
                                                             ("running_var", running_var))
                  for other, a in (("x", x), ("out", out)) if a is not None]
        for name, stat, other, a in pairs:
            if overlaps(stat, a):
                raise ValueError(f"{name} shares memory with {other}")
    arrays = dict(x=x, gamma=gamma, beta=beta, running_mean=running_mean,
                  running_var=running_var, out=out)
    if residual is not None:
        arrays["residual"] = residual
    device = call_steps(device, stream, **arrays)
    if running_device is not None and on_gpu:
        running_device = device.running_steps(running_mean)
    return Forward(device, x, axis, training, gamma, beta, running_mean, running_var,
                   running_device, momentum, eps, out, residual, relu)


def check_moments(x, axis, device, stream=None):
    """``(device, x, axis)`` of a ``moments`` call, checked."""
    device = choose_device(device, x)
    x = data("x", x)
    axis = channel_axis(axis, x)
    if device.NAME == "cuda":
        gpu_contiguous("x", x)
    return call_steps(device, stream, x=x), x, axis


class Backward(NamedTuple):
    """A backward call whose arguments passed every check."""

    device: object
    dy: object
    x: object
    axis: int
    training: bool
    mean: object
    invstd: object
    gamma: object
    grad_dtype: np.dtype
    out: object
    y: object = None  # the ReLU's output, whose mask y > 0 gates dy
    dresidual: object = None  # receives the gated dy


def check_backward(dy, x, stats, gamma, axis, training, out, device, stream=None,
                   activation=None, y=None, dresidual=None):
    """Every check of a backward call, before anything is computed or written (``stream``: the
    GPU stream to run on)."""
    device = choose_device(device, dy, x, out, y, dresidual)
    on_gpu = device.NAME == "cuda"
    x = data("x", x)
    dy = gradient_of("dy", dy, x)
    axis = channel_axis(axis, x)
    training = flag("training", training)
    try:
        mean, invstd = stats
    except (TypeError, ValueError):
        raise TypeError("stats must be the BatchStats (mean, invstd) that forward returned, got "
                        f"{type(stats).__name__}") from None
    channels, where = x.shape[axis], of_x(x, axis)
    mean = per_channel("stats.mean", mean, channels, where, on_gpu)
    invstd = per_channel("stats.invstd", invstd, channels, where, on_gpu)
    grad_dtype = gradient_dtype(gamma, x)
    gamma = per_channel("gamma", gamma, channels, where, on_gpu)
    if activation_value(activation):
        if y is None:
            raise ValueError("activation='relu' needs y, the forward's output (its mask y > 0 "
                             "gates dy)")
        y = like_x("y", y, x)
    elif y is not None:
        raise ValueError("y is the forward's output for activation='relu'; without an "
                         "activation backward does not use it")
    check_out(out, x, x=x, dy=dy, y=y)
    if dresidual is not None:
        check_out(dresidual, x, "dresidual", dy=dy)
        for name, a in (("x", x), ("y", y), ("out", out)):
            if a is not None and overlaps(dresidual, a):
                raise ValueError(f"dresidual shares memory with {name}; it may be dy itself, "
                                 f"or separate from x, y and out")
        if is_cuda_array(dresidual):
            dresidual = device_view(dresidual, "dresidual")
    if on_gpu:
        gpu_contiguous("x", x)
        gpu_contiguous("dy", dy)
        gpu_gradient_dtype(grad_dtype)
    arrays = {"dy": dy, "x": x, "out": out, "gamma": gamma, "stats.mean": mean,
              "stats.invstd": invstd}
    arrays.update((name, a) for name, a in (("y", y), ("dresidual", dresidual)) if a is not None)
    device = call_steps(device, stream, **arrays)
    return Backward(device, dy, x, axis, training, mean, invstd, gamma, grad_dtype, out, y,
                    dresidual)


# -- the common call, recognized in a handful of operations (docs/design.md §4.3) --------------

# FASTBN_DEVICE, looked up in os.environ's own dict: os.environ.get costs 0.7 µs, a tenth of a
# small batch norm. The lean path runs only where the variable is not set.
_ENVIRON = getattr(os.environ, "_data", os.environ)
_DEVICE_VARIABLE = os.environ.encodekey("FASTBN_DEVICE") if _ENVIRON is not os.environ \
    else "FASTBN_DEVICE"


def _plain(a, channels):
    """Whether ``a`` is None or a C-contiguous float32/float64 NumPy array of shape (C,)."""
    return a is None or (type(a) is np.ndarray and a.shape == (channels,)
                         and a.dtype in DATA_DTYPES and a.flags.c_contiguous)


def _apart(a, b, c=None):
    """Whether NumPy arrays ``a``, ``b`` (and ``c``) share no memory."""
    if a.flags.owndata and b.flags.owndata and a is not b and (
            c is None or c.flags.owndata and c is not a and c is not b):
        return True  # separate allocations
    return not (np.may_share_memory(a, b) or c is not None and (
        np.may_share_memory(a, c) or np.may_share_memory(b, c)))


def _lean_view(x, axis, device):
    """``x`` as ``(outer, C, inner)``, if it is a C-contiguous float32/float64 NumPy array computed
    on the CPU with an int channel axis, else None."""
    if not (type(x) is np.ndarray and x.dtype in DATA_DTYPES and x.flags.c_contiguous
            and type(axis) is int and (device is None or device == "cpu")
            and _ENVIRON.get(_DEVICE_VARIABLE) is None):
        return None
    shape = x.shape
    ndim = len(shape)
    if ndim == 2 and (axis == 1 or axis == -1):
        return x.reshape(shape[0], shape[1], 1)
    if not (ndim >= 2 and -ndim <= axis < ndim):
        return None
    axis %= ndim
    return x.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))


def _lean_out(out, x, x3):
    """``(result, result3)`` where the lean path writes, or None if ``out`` needs the full checks.
    The lean path takes None (a new array), x, or a C-contiguous writable array like x."""
    if out is None:
        out = _outputs.empty(x.shape, x.dtype)
    elif not (type(out) is np.ndarray and out.flags.writeable  # x itself may be read-only
              and (out is x or (out.dtype == x.dtype and out.shape == x.shape
                                and out.flags.c_contiguous))):
        return None
    return out, out.reshape(x3.shape)


def _lean_like(a, x):
    """Whether ``a`` is a C-contiguous NumPy array of x's shape and dtype."""
    return (type(a) is np.ndarray and a.dtype == x.dtype and a.shape == x.shape
            and a.flags.c_contiguous)


def lean_forward(x, gamma, beta, axis, training, running_mean, running_var, momentum, eps, out,
                 device, residual=None, activation=None):
    """The common forward call: ``(x3, y, y3, residual3)`` to run with ``cpu.batch_norm``, or
    None.

    Common: C-contiguous float32/float64 NumPy x, out and residual on the CPU, float32/float64
    (C,) parameters and running statistics, Python floats, an int axis, no array sharing memory
    with another that the call writes.
    """
    x3 = _lean_view(x, axis, device)
    if x3 is None or not ((training is True or training is False)
                          and type(eps) is float and 0.0 < eps < math.inf
                          and type(momentum) is float and 0.0 <= momentum <= 1.0
                          and (activation is None or type(activation) is str
                               and activation == "relu")):
        return None
    residual3 = None
    if residual is not None:
        if not (_lean_like(residual, x) and (out is None or out is residual
                                             or _apart(out, residual))):
            return None
        residual3 = residual.reshape(x3.shape)
    channels = x3.shape[1]
    written = _lean_out(out, x, x3)
    if written is None or not (_plain(gamma, channels) and _plain(beta, channels)):
        return None
    if running_mean is not None or running_var is not None:
        if not (_plain(running_mean, channels) and _plain(running_var, channels)
                and running_mean is not None and running_var is not None):
            return None
        if training and not (running_mean.flags.writeable and running_var.flags.writeable
                             and _apart(running_mean, running_var, x)
                             and (out is None or out is x or _apart(running_mean, running_var,
                                                                     out))):
            return None
    elif not training:
        return None
    if training and x3.shape[0] * x3.shape[2] < 2 \
            or out is not None and out is not x and not _apart(x, out):
        return None
    return (x3, *written, residual3)


def lean_backward(dy, x, stats, gamma, axis, training, out, device, activation=None, y=None,
                  dresidual=None):
    """The common backward call: ``(dy3, x3, dx, dx3, mean, invstd, y3, dresidual3)`` to run
    with ``cpu.batch_norm_backward``, or None. Common: as for ``lean_forward``, with dy, y and
    dresidual like x and the float64 stats that forward returned."""
    x3 = _lean_view(x, axis, device)
    if x3 is None or not (training is True or training is False) \
            or type(dy) is not np.ndarray or dy.dtype != x.dtype or dy.shape != x.shape \
            or not dy.flags.c_contiguous or not isinstance(stats, tuple) or len(stats) != 2:
        return None
    channels = x3.shape[1]
    mean, invstd = stats
    if not (_plain(gamma, channels) and mean is not None and invstd is not None
            and _plain(mean, channels) and _plain(invstd, channels)
            and mean.dtype == np.float64 and invstd.dtype == np.float64):
        return None
    written = _lean_out(out, x, x3)
    if written is None or out is not None and out is not x and out is not dy \
            and not (_apart(out, x) and (dy is x or _apart(out, dy))):
        return None
    y3 = dresidual3 = None
    if activation is not None or y is not None:
        if not (type(activation) is str and activation == "relu" and _lean_like(y, x)
                and (out is None or out is y or _apart(out, y))):
            return None
        y3 = y.reshape(x3.shape)
    if dresidual is not None:
        if not (_lean_like(dresidual, x) and dresidual.flags.writeable
                and (dresidual is dy or _apart(dresidual, dy))
                and _apart(dresidual, x) and (y is None or _apart(dresidual, y))
                and (out is None or _apart(dresidual, out))):
            return None
        dresidual3 = dresidual.reshape(x3.shape)
    return (dy.reshape(x3.shape), x3, *written, mean, invstd, y3, dresidual3)
