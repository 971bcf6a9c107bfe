"""``forward`` and ``backward``: check every argument, choose the device once, run its steps.

The device module (``fastbn.cpu`` or ``fastbn.cuda``, docs/design.md §2) does the work on the
``(outer, C, inner)`` view; nothing here branches on the device. The one shortcut: the common CPU
call (C-contiguous NumPy arrays that need no conversion) is recognized by ``lean_forward`` /
``lean_backward`` and runs as one compiled call (docs/design.md §4.3).
"""
from typing import NamedTuple

from . import cpu
from ._checks import check_backward, check_forward, lean_backward, lean_forward


class BatchStats(NamedTuple):
    """The per-channel statistics a forward pass normalized with, as ``backward`` needs them.

    Attributes
    ----------
    mean : ndarray, shape (C,), float64
        Batch mean in training, ``running_mean`` in eval.
    invstd : ndarray, shape (C,), float64
        ``1 / sqrt(var + eps)``, with the biased batch variance in training, ``running_var`` in eval.
    """

    mean: object
    invstd: object


_new_tuple = tuple.__new__  # BatchStats without NamedTuple's Python-level __new__


def forward(x, gamma=None, beta=None, *, axis=1, training=True, running_mean=None,
            running_var=None, momentum=0.1, eps=1e-5, out=None, device=None, stream=None,
            residual=None, activation=None):
    """Batch normalization of ``x`` over every axis but the channel ``axis``, optionally fused
    with a residual add and a ReLU: ``y = act(BN(x) + residual)``.

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
        Where to write y: x's shape and dtype; may be ``x`` or ``residual`` itself.
    device : {None, "cpu", "cuda"}
        None picks by where x lives.
    stream : CUDA stream, optional
        On the GPU, the stream every kernel and copy of the call runs on (a Numba stream, an
        object with ``__cuda_stream__`` such as ``torch.cuda.current_stream()``, or an integer
        handle); by default the producer's stream that x's ``__cuda_array_interface__`` names,
        else Numba's default stream. Ignored on the CPU.
    residual : ndarray, optional
        Added to the normalized x before the activation: x's shape, dtype and device; read only.
    activation : {None, "relu"}
        Applied last. The sum and the ReLU are taken in float64 and rounded once, so with
        ``activation="relu"`` alone y is exactly ``np.maximum(plain_y, 0)``. The statistics and
        the running statistics are those of plain batch norm on x.

    Returns
    -------
    y : ndarray
        x's shape and dtype (``out`` if given).
    stats : BatchStats
        The float64 ``(mean, invstd)`` used, for ``backward``.
    """
    lean = lean_forward(x, gamma, beta, axis, training, running_mean, running_var, momentum, eps,
                        out, device, residual, activation)
    if lean is not None:
        x3, y, y3, residual3 = lean
        stats = cpu.batch_norm(x3, y3, gamma, beta, eps, training, running_mean, running_var,
                               momentum, residual3, activation is not None)
        return y, _new_tuple(BatchStats, (stats[0], stats[1]))
    return run_forward(check_forward(x, gamma, beta, axis, training, running_mean, running_var,
                                     momentum, eps, out, device, stream=stream, residual=residual,
                                     activation=activation))


def _prepare(call, *inputs):
    """The call's device, its inputs as ``(outer, C, inner)`` arrays there (None stays None),
    and its output."""
    device = call.device
    view = device.view(call.x, call.axis)
    given = iter(device.operands(view, *(a for a in inputs if a is not None)))
    operands = [None if a is None else next(given) for a in inputs]
    return device, operands, device.output(view, call.out, call.x)


def _affine_parameters(call, device):
    channels = call.x.shape[call.axis]
    return (device.per_channel(call.gamma, channels, 1.0),
            device.per_channel(call.beta, channels, 0.0))


def run_forward(call):
    """Run a checked forward call."""
    if not call.training:
        return normalize_with(call, call.running_mean, call.running_var)
    device, (x3, residual3), y = _prepare(call, call.x, call.residual)
    shift, delta, m2 = device.moments(x3)
    mean, var, invstd = device.forward_map(x3, y.array3, shift, delta, m2,
                                           *_affine_parameters(call, device), call.eps,
                                           residual3, call.relu)
    count = x3.shape[0] * x3.shape[2]
    _update_running(call, mean, var, count / (count - 1))
    y, mean, invstd = y.finish(mean, invstd)
    return y, BatchStats(mean, invstd)


def normalize_with(call, mean, var, unbiased_var=None):
    """y of a checked call normalized with the given ``mean`` and biased ``var``, and the running
    statistics updated with ``unbiased_var`` if given (host or device arrays, shape (C,))."""
    device, (x3, residual3), y = _prepare(call, call.x, call.residual)
    channels = x3.shape[1]
    mean = device.per_channel(mean, channels, copy=True)  # stats must not alias running_mean
    invstd = device.normalize_with(x3, y.array3, mean, device.per_channel(var, channels),
                                   *_affine_parameters(call, device), call.eps, residual3,
                                   call.relu)
    _update_running(call, mean, unbiased_var, 1.0)
    y, mean, invstd = y.finish(mean, invstd)
    return y, BatchStats(mean, invstd)


def _update_running(call, mean, var, unbias):
    """Update the running statistics of a training call, where they live (host or device), with
    the batch's ``mean`` and unbiased variance ``var·unbias``."""
    if not call.training or call.running_mean is None:
        return
    where, channels = call.running_device, call.x.shape[call.axis]
    where.update_running(call.running_mean, call.running_var, where.per_channel(mean, channels),
                         where.per_channel(var, channels), call.momentum, unbias)


def backward(dy, x, stats, gamma=None, *, axis=1, training=True, out=None, device=None,
             stream=None, activation=None, y=None, dresidual=None):
    """Gradients of batch normalization: ``dx, dgamma, dbeta`` from ``dy = ∂loss/∂y``, of plain
    batch norm or of ``forward``'s fused ``act(BN(x) + residual)``.

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
        Where to write dx: x's shape and dtype; may be ``dy``, ``x`` or ``y`` itself.
    device : {None, "cpu", "cuda"}
        None picks by where the arrays live.
    stream : CUDA stream, optional
        As for ``forward`` (by default the producer's stream of dy or x).
    activation : {None, "relu"}
        The forward's activation. With ``"relu"``, dy is taken as 0 where ``y <= 0``.
    y : ndarray, optional
        The forward's output, required with ``activation="relu"`` (and only then): its mask
        ``y > 0`` is read in the passes that read dy. It must not have been modified since.
    dresidual : ndarray, optional
        Receives the residual's gradient, dy masked by the activation (dy itself without one),
        in the same pass as dx: x's shape and dtype; may be ``dy`` itself, else separate from
        x, y, dy and ``out``.

    Returns
    -------
    dx : ndarray
        x's shape and dtype (``out`` if given).
    dgamma, dbeta : ndarray, shape (C,)
        ``Σ dy·x̂`` and ``Σ dy``, in gamma's dtype (x's if gamma is None or not floating).
    """
    lean = lean_backward(dy, x, stats, gamma, axis, training, out, device, activation, y,
                         dresidual)
    if lean is not None:
        dy3, x3, dx, dx3, mean, invstd, y3, dresidual3 = lean
        grads = cpu.batch_norm_backward(dy3, x3, dx3, mean, invstd, gamma, training, y3,
                                        dresidual3)
        return dx, grads[0], grads[1]
    return run_backward(check_backward(dy, x, stats, gamma, axis, training, out, device,
                                       stream=stream, activation=activation, y=y,
                                       dresidual=dresidual))


def run_backward(call, add=None):
    """Run a checked backward call.

    ``add``, given for a batch spread over processes (fastbn.distributed), takes x's float64
    host ``(Σdy, Σdy·(x − μ), count)`` and returns the whole batch's. dgamma and dbeta are x's
    share.
    """
    device, (x3, dy3, y3), dx = _prepare(call, call.x, call.dy, call.y)
    dresidual = None
    if call.dresidual is not None:
        dresidual = device.output(device.view(call.x, call.axis), call.dresidual, call.x)
    channels, count = x3.shape[1], x3.shape[0] * x3.shape[2]
    mean = device.per_channel(call.mean, channels)
    invstd = device.per_channel(call.invstd, channels)
    sum_dy, sum_dy_xmu = device.gradient_sums(dy3, x3, mean, y3)
    total = sum_dy, sum_dy_xmu, count
    if add is not None:
        total_dy, total_dy_xmu, count = add(device.to_host(sum_dy), device.to_host(sum_dy_xmu),
                                            count)
        total = (device.per_channel(total_dy, channels), device.per_channel(total_dy_xmu, channels),
                 count)
    device.backward_map(dy3, x3, dx.array3, mean, invstd,
                        device.per_channel(call.gamma, channels, 1.0), *total, call.training, y3,
                        None if dresidual is None else dresidual.array3)
    if dresidual is not None:
        dresidual.finish()
    return dx.finish(*device.parameter_gradients(sum_dy, sum_dy_xmu, invstd, call.grad_dtype))
