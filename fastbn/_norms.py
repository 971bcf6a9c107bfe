"""Layer, group, instance and RMS normalization: batch norm's two steps over other groupings.

Each op views x as ``(rows, P, S)`` (fastbn._layout.GroupView), takes statistics per row and
scales element ``(r, p, s)`` by parameter ``(r % groups)·P + p`` (docs/design.md §2.7):

============== ======================== ============ ======= =========== =================
op             rows                     P            S       groups      parameters
============== ======================== ============ ======= =========== =================
layer, RMS     prod(x.shape[:-k])       prod(shape)  1       1           normalized_shape
group          N·G                      C/G          spatial G           (C,)
instance       N·C                      1            spatial C           (C,)
============== ======================== ============ ======= =========== =================

Here the arguments are checked (nothing is computed or written before every check has passed) and
the device's ``group_*`` steps run; nothing branches on the device.
"""
import math
import operator
from typing import NamedTuple

import numpy as np

from . import _outputs, cpu
from ._arrays import call_steps, device_view, is_cuda_array, overlaps
from ._checks import (
    _DEVICE_VARIABLE,
    _ENVIRON,
    DATA_DTYPES,
    _apart,
    _lean_like,
    check_out,
    choose_device,
    data,
    eps_value,
    flag,
    gpu_contiguous,
    gpu_gradient_dtype,
    gradient_dtype,
    gradient_of,
    momentum_value,
    running,
    where_lives,
)
from ._layout import GroupView


class NormStats(NamedTuple):
    """The per-group statistics a forward pass normalized with, as its backward needs them.

    Attributes
    ----------
    mean : ndarray, float64, or None
        The mean of each normalized group (None for RMS norm, which does not centre).
    invstd : ndarray, float64
        ``1 / sqrt(var + eps)`` of each group (RMS norm: ``1 / sqrt(mean(x²) + eps)``).

    Shapes: ``x.shape[:-k]`` for layer and RMS norm over k axes, ``(N, G)`` for group norm,
    ``(N, C)`` for instance norm.
    """

    mean: object
    invstd: object


_new_tuple = tuple.__new__  # NormStats without NamedTuple's Python-level __new__


class _Op(NamedTuple):
    """How one op on one x groups it: the view, the statistics' and parameters' shapes."""

    name: str  # for messages: "layer_norm", ...
    view: GroupView
    groups: int
    stats_shape: tuple
    parameter_shape: tuple
    where: str  # what the parameters belong to, for messages


# -- the groupings ------------------------------------------------------------------------------


def _shape_argument(normalized_shape):
    """normalized_shape as a tuple of ints (an int is one axis)."""
    try:
        if isinstance(normalized_shape, (bool, np.bool_)):
            raise TypeError
        return (operator.index(normalized_shape),)
    except TypeError:
        pass
    try:
        shape = tuple(normalized_shape)
        if any(isinstance(n, (bool, np.bool_)) for n in shape):
            raise TypeError
        return tuple(operator.index(n) for n in shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{normalized_shape!r}") from None


def _last_axes(name, x, normalized_shape):
    shape = _shape_argument(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k:] != shape:
        raise ValueError(f"{name}: normalized_shape {shape} must equal the last {k} axes of x, "
                         f"got x of shape {x.shape}")
    if math.prod(shape) == 0:
        raise ValueError(f"{name}: normalized_shape {shape} holds no values to normalize")
    lead = x.shape[:x.ndim - k]
    return _Op(name, GroupView(x, (math.prod(lead), math.prod(shape), 1)), 1, lead, shape,
               f"normalized_shape {shape}")


def _channel_groups(name, x, groups, minimum_ndim):
    if x.ndim < minimum_ndim:
        raise ValueError(f"{name} needs x of at least {minimum_ndim} dimensions (N, C, ...), got "
                         f"shape {x.shape}")
    n, channels = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    if channels % groups:
        raise ValueError(f"{name}: num_groups {groups} must divide the channels of x (shape "
                         f"{x.shape}, C = {channels})")
    if channels // groups * spatial == 0:
        raise ValueError(f"{name}: the groups of x (shape {x.shape}) hold no values to "
                         f"normalize")
    return _Op(name, GroupView(x, (n * groups, channels // groups, spatial)), groups,
               (n, groups), (channels,), f"the {channels} channels of x (shape {x.shape})")


def _layer_op(x, normalized_shape, name="layer_norm"):
    return _last_axes(name, x, normalized_shape)


def _group_op(x, num_groups, name="group_norm"):
    if isinstance(num_groups, (bool, np.bool_)):
        raise TypeError(f"num_groups must be a positive integer, got {num_groups!r}")
    try:
        groups = operator.index(num_groups)
    except TypeError:
        raise TypeError(f"num_groups must be a positive integer, got {num_groups!r}") from None
    if groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {groups}")
    return _channel_groups(name, x, groups, 2)


def _instance_op(x, name="instance_norm"):
    if x.ndim < 3:
        raise ValueError(f"{name} needs x of at least 3 dimensions (N, C, spatial...), got "
                         f"shape {x.shape}")
    return _channel_groups(name, x, x.shape[1], 3)


# -- checks -------------------------------------------------------------------------------------


def _vector(name, a, op, on_gpu, shape, per):
    """A real array of ``shape`` (``per`` says what its values belong to, for the message),
    flattened: float64 on the host; a CUDA array stays a (C-contiguous) device view, which the
    device converts."""
    cuda_array = is_cuda_array(a)
    arr = device_view(a, name) if cuda_array else np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real-valued array, got dtype {arr.dtype} "
                        f"(shape {arr.shape})")
    if tuple(arr.shape) != shape:
        raise ValueError(f"{op.name}: {name} must have shape {shape}, one value per {per}, got "
                         f"shape {tuple(arr.shape)}")
    if cuda_array:
        if not on_gpu:
            raise TypeError(f"{name} is a CUDA array, but x is a NumPy array computed on the CPU;"
                            f" pass {name} as a NumPy array, or x on the GPU")
        gpu_contiguous(name, arr)
        return arr.reshape(-1)
    return np.ascontiguousarray(arr, np.float64).reshape(-1)


def _parameter(name, a, op, on_gpu):
    """gamma or beta: None, or a real array of the op's parameter shape (``_vector``)."""
    if a is None:
        return None
    return _vector(name, a, op, on_gpu, op.parameter_shape, f"element of {op.where}")


def _statistic(name, a, op, on_gpu):
    """stats.mean or stats.invstd: a real array of the op's statistics shape (``_vector``)."""
    return _vector(name, a, op, on_gpu, op.stats_shape, "normalized group of x")


class _Forward(NamedTuple):
    device: object
    op: _Op
    x: object
    gamma: object
    beta: object
    eps: float
    out: object


class _Backward(NamedTuple):
    device: object
    op: _Op
    dy: object
    x: object
    mean: object
    invstd: object
    gamma: object
    grad_dtype: np.dtype
    out: object


def _check_forward(x, grouping, gamma, beta, eps, out, device, stream, *other):
    """The forward call checked; ``grouping(x)`` makes its ``_Op``. ``eps`` None (RMS norm's
    default) means x's dtype's machine epsilon."""
    device = choose_device(device, x, out)
    on_gpu = device.NAME == "cuda"
    x = data("x", x)
    op = grouping(x)
    gamma = _parameter("gamma", gamma, op, on_gpu)
    beta = _parameter("beta", beta, op, on_gpu)
    eps = float(np.finfo(x.dtype).eps) if eps is None else eps_value(eps)
    check_out(out, x, x=x)
    if on_gpu:
        gpu_contiguous("x", x)
    device = call_steps(device, stream, x=x, gamma=gamma, beta=beta, out=out,
                        **{f"running_{k}": a for k, a in enumerate(other) if a is not None})
    return _Forward(device, op, x, gamma, beta, eps, out)


def _check_backward(dy, x, stats, grouping, gamma, out, device, stream, centred=True):
    device = choose_device(device, dy, x, out)
    on_gpu = device.NAME == "cuda"
    x = data("x", x)
    dy = gradient_of("dy", dy, x)
    op = grouping(x)
    try:
        mean, invstd = stats
    except (TypeError, ValueError):
        raise TypeError(f"stats must be the NormStats (mean, invstd) that {op.name} returned, "
                        f"got {type(stats).__name__}") from None
    if centred:
        if mean is None:
            raise ValueError(f"{op.name}: stats.mean is None (RMS norm's statistics?); "
                             f"{op.name}_backward needs the mean its forward returned")
        mean = _statistic("stats.mean", mean, op, on_gpu)
    elif mean is not None:
        raise ValueError("rms_norm_backward: stats.mean must be None, as rms_norm returns it "
                         "(RMS norm does not centre)")
    invstd = _statistic("stats.invstd", invstd, op, on_gpu)
    grad_dtype = gradient_dtype(gamma, x)
    gamma = _parameter("gamma", gamma, op, on_gpu)
    check_out(out, x, x=x, dy=dy)
    if on_gpu:
        gpu_contiguous("x", x)
        gpu_contiguous("dy", dy)
        gpu_gradient_dtype(grad_dtype)
    device = call_steps(device, stream, dy=dy, x=x, out=out, gamma=gamma, **{
        "stats.mean": mean, "stats.invstd": invstd})
    return _Backward(device, op, dy, x, mean, invstd, gamma, grad_dtype, out)


# -- the common call, recognized in a handful of operations (as fastbn._checks' lean path) ------


def _lean_x(x, device):
    """Whether x is a C-contiguous float32/float64 NumPy array computed on the CPU."""
    return (type(x) is np.ndarray and x.dtype in DATA_DTYPES and x.flags.c_contiguous
            and (device is None or device == "cpu") and _ENVIRON.get(_DEVICE_VARIABLE) is None)


def _lean_parameter(a, shape):
    """``a`` flat (float32 or float64, as it is: the kernels compute in float64 either way) if
    None or a plain C-contiguous float array of ``shape``; False otherwise."""
    if a is None:
        return None
    if type(a) is np.ndarray and a.shape == shape and a.dtype in DATA_DTYPES \
            and a.flags.c_contiguous:
        return a if a.ndim == 1 else a.reshape(-1)
    return False


def _lean_grouping(x, name, arg):
    """``(rows, runs, groups, stats_shape, parameter_shape)`` of a lean call, or None."""
    shape = x.shape
    if name == "layer":
        if type(arg) is int:
            arg = (arg,)
        elif type(arg) is not tuple:
            return None
        k = len(arg)
        if not (0 < k <= len(shape) and shape[len(shape) - k:] == arg):
            return None
        size = math.prod(arg)
        lead = shape[:len(shape) - k]
        return (math.prod(lead), size, 1, lead, arg) if size else None
    if len(shape) < 2:
        return None
    n, channels, spatial = shape[0], shape[1], math.prod(shape[2:])
    groups = channels if name == "instance" else arg
    if type(groups) is not int or groups < 1 or channels % groups or spatial < 1:
        return None
    if name == "instance" and (len(shape) < 3 or spatial < 2):
        return None
    return n * groups, channels // groups, groups, (n, groups), (channels,)


def _lean_forward(name, x, arg, gamma, beta, eps, out, device, centred=True):
    """The common forward call run in one compiled call: ``(y, NormStats)``, or None."""
    if not (_lean_x(x, device) and type(eps) is float and 0.0 < eps < math.inf):
        return None
    grouping = _lean_grouping(x, name, arg)
    if grouping is None:
        return None
    rows, runs, groups, stats_shape, parameter_shape = grouping
    gamma = _lean_parameter(gamma, parameter_shape)
    beta = _lean_parameter(beta, parameter_shape)
    if gamma is False or beta is False:
        return None
    if out is None:
        y = _outputs.empty(x.shape, x.dtype)
    elif out is x and x.flags.writeable or (_lean_like(out, x) and out.flags.writeable
                                            and _apart(out, x)):
        y = out
    else:
        return None
    parameters = groups * runs
    stats = np.empty((3, rows))
    cpu.norm_rows(x.reshape(rows, -1), y.reshape(rows, -1), runs, groups,
                  cpu._constant(1.0, parameters) if gamma is None else gamma,
                  cpu._constant(0.0, parameters) if beta is None else beta, eps, centred, stats)
    return y, _new_tuple(NormStats, (stats[0].reshape(stats_shape) if centred else None,
                                     stats[2].reshape(stats_shape)))


def _lean_statistic(a, shape):
    return (type(a) is np.ndarray and a.shape == shape and a.dtype == np.float64
            and a.flags.c_contiguous)


def _lean_backward(name, dy, x, stats, arg, gamma, out, device, training=True, centred=True):
    """The common backward call run in one compiled call: ``(dx, dgamma, dbeta)``, or None."""
    if not (_lean_x(x, device) and _lean_like(dy, x) and (training is True or training is False)
            and type(stats) is NormStats):
        return None
    grouping = _lean_grouping(x, name, arg)
    if grouping is None:
        return None
    rows, runs, groups, stats_shape, parameter_shape = grouping
    mean, invstd = stats
    if not (_lean_statistic(invstd, stats_shape)
            and (_lean_statistic(mean, stats_shape) if centred else mean is None)):
        return None
    grad_dtype = x.dtype if gamma is None else getattr(gamma, "dtype", None)
    gamma = _lean_parameter(gamma, parameter_shape)
    if gamma is False:
        return None
    if out is None:
        dx = _outputs.empty(x.shape, x.dtype)
    elif (out is x or out is dy) and out.flags.writeable or (
            _lean_like(out, x) and out.flags.writeable and _apart(out, x) and _apart(out, dy)):
        dx = out
    else:
        return None
    parameters = groups * runs
    grads = np.empty((2, parameters), grad_dtype)
    cpu.norm_rows_backward(dy.reshape(rows, -1), x.reshape(rows, -1), dx.reshape(rows, -1), runs,
                           groups, None if mean is None else mean.reshape(-1),
                           invstd.reshape(-1),
                           cpu._constant(1.0, parameters) if gamma is None else gamma, training,
                           grads)
    return dx, grads[0].reshape(parameter_shape), grads[1].reshape(parameter_shape)


# -- running ------------------------------------------------------------------------------------


def _run_forward(call, centred=True, statistics=None):
    """``(y, NormStats, var)``: x normalized per group with its own statistics, or with the given
    per-row ``(mean, invstd)``. ``var`` is the device's per-row variance (None with given
    statistics)."""
    device, op = call.device, call.op
    (x3,) = device.operands(op.view, call.x)
    y = device.output(op.view, call.out, call.x)
    parameters = math.prod(op.parameter_shape)
    gamma = device.per_channel(call.gamma, parameters, 1.0)
    beta = device.per_channel(call.beta, parameters, 0.0)
    if statistics is None:
        mean, var, invstd = device.group_forward(x3, y.array3, op.groups, gamma, beta, call.eps,
                                                 centred)
    else:
        mean, invstd = statistics
        var = None
        device.group_normalize_with(x3, y.array3, op.groups, mean, invstd, gamma, beta)
    if mean is None:
        y, invstd = y.finish(invstd)
    else:
        y, mean, invstd = y.finish(mean, invstd)
        mean = mean.reshape(op.stats_shape)
    return y, NormStats(mean, invstd.reshape(op.stats_shape)), var


def _run_backward(call, training=True):
    device, op = call.device, call.op
    x3, dy3 = device.operands(op.view, call.x, call.dy)
    dx = device.output(op.view, call.out, call.x)
    parameters = math.prod(op.parameter_shape)
    mean = None if call.mean is None else device.per_channel(call.mean, call.mean.size)
    invstd = device.per_channel(call.invstd, call.invstd.size)
    gamma = device.per_channel(call.gamma, parameters, 1.0)
    dgamma, dbeta = device.group_backward(dy3, x3, dx.array3, op.groups, mean, invstd, gamma,
                                          training)
    dgamma, dbeta = device.cast(dgamma, call.grad_dtype), device.cast(dbeta, call.grad_dtype)
    dx, dgamma, dbeta = dx.finish(dgamma, dbeta)
    return dx, dgamma.reshape(op.parameter_shape), dbeta.reshape(op.parameter_shape)


# -- the ops ------------------------------------------------------------------------------------


def layer_norm(x, normalized_shape, gamma=None, beta=None, *, eps=1e-5, out=None, device=None,
               stream=None):
    """Layer normalization: each sample normalized over its last ``len(normalized_shape)`` axes,
    then scaled and shifted per element of ``normalized_shape`` (``torch.nn.functional.layer_norm``).

    Parameters
    ----------
    x : ndarray, float32 or float64
        Its last axes equal ``normalized_shape``.
    normalized_shape : int or tuple of ints
        The axes normalized over.
    gamma, beta : array_like of shape ``normalized_shape``, optional
        Scale and shift; None means 1 and 0.
    eps : float > 0
        Added to the (biased) variance.
    out : ndarray, optional
        Where to write y: x's shape and dtype; may be x itself.
    device : {None, "cpu", "cuda"}
        None picks by where x lives.
    stream : CUDA stream, optional
        As for ``fastbn.forward``; ignored on the CPU.

    Returns
    -------
    y : ndarray
        x's shape and dtype (``out`` if given).
    stats : NormStats
        float64 ``mean`` and ``invstd`` of shape ``x.shape[:-k]``, for ``layer_norm_backward``.
    """
    lean = _lean_forward("layer", x, normalized_shape, gamma, beta, eps, out, device)
    if lean is not None:
        return lean
    call = _check_forward(x, lambda a: _layer_op(a, normalized_shape), gamma, beta,
                          eps_value(eps), out, device, stream)
    return _run_forward(call)[:2]


def layer_norm_backward(dy, x, stats, normalized_shape, gamma=None, *, out=None, device=None,
                        stream=None):
    """Gradients of ``layer_norm``: ``dx, dgamma, dbeta`` (dgamma, dbeta of normalized_shape, in
    gamma's dtype, x's without gamma). ``out`` (x's shape and dtype) may be dy or x."""
    lean = _lean_backward("layer", dy, x, stats, normalized_shape, gamma, out, device)
    if lean is not None:
        return lean
    call = _check_backward(dy, x, stats, lambda a: _layer_op(a, normalized_shape,
                                                             "layer_norm_backward"),
                           gamma, out, device, stream)
    return _run_backward(call)


def group_norm(x, num_groups, gamma=None, beta=None, *, eps=1e-5, out=None, device=None,
               stream=None):
    """Group normalization: the channels (axis 1) of each sample cut into ``num_groups`` groups,
    each normalized over its channels and spatial axes, then scaled and shifted per channel
    (``torch.nn.functional.group_norm``).

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C, ...)
    num_groups : int
        Divides C.
    gamma, beta : array_like, shape (C,), optional
    eps, out, device, stream
        As for ``layer_norm``.

    Returns
    -------
    y : ndarray
    stats : NormStats
        float64 ``mean`` and ``invstd`` of shape ``(N, num_groups)``.
    """
    lean = _lean_forward("group", x, num_groups, gamma, beta, eps, out, device)
    if lean is not None:
        return lean
    call = _check_forward(x, lambda a: _group_op(a, num_groups), gamma, beta, eps_value(eps),
                          out, device, stream)
    return _run_forward(call)[:2]


def group_norm_backward(dy, x, stats, num_groups, gamma=None, *, out=None, device=None,
                        stream=None):
    """Gradients of ``group_norm``: ``dx, dgamma, dbeta`` (dgamma, dbeta of shape (C,))."""
    lean = _lean_backward("group", dy, x, stats, num_groups, gamma, out, device)
    if lean is not None:
        return lean
    call = _check_backward(dy, x, stats, lambda a: _group_op(a, num_groups,
                                                             "group_norm_backward"),
                           gamma, out, device, stream)
    return _run_backward(call)


def instance_norm(x, gamma=None, beta=None, *, eps=1e-5, running_mean=None, running_var=None,
                  training=True, momentum=0.1, out=None, device=None, stream=None):
    """Instance normalization: each channel of each sample normalized over its spatial axes,
    then scaled and shifted per channel (``torch.nn.functional.instance_norm``).

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C, spatial...)
    gamma, beta : array_like, shape (C,), optional
    running_mean, running_var : ndarray, shape (C,), optional
        Both or neither. With ``training=True`` they are updated in place, as PyTorch does: each
        by the average over the batch of its samples' updates (``momentum``; the unbiased
        variance of each instance). With ``training=False`` x is normalized with them.
    training : bool
        Whether to normalize with each instance's own statistics.
    momentum : float in [0, 1]
    eps, out, device, stream
        As for ``layer_norm``.

    Returns
    -------
    y : ndarray
    stats : NormStats
        float64 ``mean`` and ``invstd`` of shape ``(N, C)``: each instance's, or the running
        statistics repeated for every sample in eval.
    """
    if training is True and running_mean is None and running_var is None \
            and type(momentum) is float and 0.0 <= momentum <= 1.0:
        lean = _lean_forward("instance", x, None, gamma, beta, eps, out, device)
        if lean is not None:
            return lean
    training = flag("training", training)
    momentum = momentum_value(momentum)
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"running_mean and running_var go together: pass both or neither (only "
                         f"{given} was given)")
    call = _check_forward(x, _instance_op, gamma, beta, eps_value(eps), out, device, stream,
                          running_mean, running_var)
    x = call.x
    spatial = math.prod(x.shape[2:])
    if training and spatial < 2:
        raise ValueError(f"instance_norm in training needs more than one spatial value per "
                         f"channel, got x of shape {x.shape}")
    if running_mean is not None:
        on_gpu = call.device.NAME == "cuda"
        running("running_mean", running_mean, x, 1, training, on_gpu)
        running("running_var", running_var, x, 1, training, on_gpu)
        if training:
            for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
                for other, a in (("x", x), ("out", call.out),
                                 ("running_var", running_var if stat is running_mean else None)):
                    if a is not None and overlaps(stat, a):
                        raise ValueError(f"{name} shares memory with {other}")
    elif not training:
        raise ValueError(f"instance_norm with training=False normalizes with running_mean and "
                         f"running_var, which were not given (x of shape {x.shape})")
    if not training:
        host = where_lives(running_mean)
        mean, var = (np.repeat(host.to_host(device_view(a) if is_cuda_array(a) else a)[None]
                               .astype(np.float64), x.shape[0], 0)
                     for a in (running_mean, running_var))
        invstd = 1.0 / np.sqrt(var + call.eps)
        device = call.device
        rows = mean.size
        y, stats, _ = _run_forward(call, statistics=(device.per_channel(mean.reshape(-1), rows),
                                                     device.per_channel(invstd.reshape(-1),
                                                                        rows)))
        return y, stats
    y, stats, var = _run_forward(call)
    if running_mean is not None:
        n, channels = x.shape[0], x.shape[1]
        batch_mean = np.asarray(call.device.to_host(stats.mean) if is_cuda_array(stats.mean)
                                else stats.mean).reshape(n, channels).mean(axis=0)
        batch_var = np.asarray(call.device.to_host(var)).reshape(n, channels).mean(axis=0)
        where = where_lives(running_mean)
        if where.NAME == "cuda":
            where = call.device.running_steps(running_mean)
        where.update_running(running_mean, running_var, where.per_channel(batch_mean, channels),
                             where.per_channel(batch_var, channels), momentum,
                             spatial / (spatial - 1))
    return y, stats


def instance_norm_backward(dy, x, stats, gamma=None, *, training=True, out=None, device=None,
                           stream=None):
    """Gradients of ``instance_norm``: ``dx, dgamma, dbeta`` (shape (C,)). ``training`` as the
    forward's: whether the gradient flows through each instance's statistics."""
    lean = _lean_backward("instance", dy, x, stats, None, gamma, out, device, training)
    if lean is not None:
        return lean
    training = flag("training", training)
    call = _check_backward(dy, x, stats, lambda a: _instance_op(a, "instance_norm_backward"),
                           gamma, out, device, stream)
    return _run_backward(call, training)


def rms_norm(x, normalized_shape, gamma=None, *, eps=None, out=None, device=None, stream=None):
    """RMS normalization: each sample divided by the root mean square of its last
    ``len(normalized_shape)`` axes, then scaled per element (``torch.nn.functional.rms_norm``).

    Parameters
    ----------
    x, normalized_shape, gamma, out, device, stream
        As for ``layer_norm`` (no beta).
    eps : float > 0 or None
        Added to the mean square; None means ``np.finfo(x.dtype).eps``, as PyTorch.

    Returns
    -------
    y : ndarray
    stats : NormStats
        ``mean`` None, and the float64 ``invstd = 1/sqrt(mean(x²) + eps)`` of shape
        ``x.shape[:-k]``.
    """
    if eps is None and type(x) is np.ndarray and x.dtype in DATA_DTYPES:
        eps = float(np.finfo(x.dtype).eps)
    lean = _lean_forward("layer", x, normalized_shape, gamma, None, eps, out, device, False)
    if lean is not None:
        return lean
    call = _check_forward(x, lambda a: _layer_op(a, normalized_shape, "rms_norm"), gamma, None,
                          eps, out, device, stream)
    return _run_forward(call, centred=False)[:2]


def rms_norm_backward(dy, x, stats, normalized_shape, gamma=None, *, out=None, device=None,
                      stream=None):
    """Gradients of ``rms_norm``: ``dx, dgamma`` (dgamma of normalized_shape)."""
    lean = _lean_backward("layer", dy, x, stats, normalized_shape, gamma, out, device,
                          centred=False)
    if lean is not None:
        return lean[:2]
    call = _check_backward(dy, x, stats, lambda a: _layer_op(a, normalized_shape,
                                                             "rms_norm_backward"),
                           gamma, out, device, stream, centred=False)
    dx, dgamma, _ = _run_backward(call)
    return dx, dgamma
