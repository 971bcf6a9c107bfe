"""Mergeable statistics: the ``Moments`` of batches in pieces, merged exactly, and training-mode
batch norm with the statistics of a larger batch (docs/design.md §3)."""
from typing import NamedTuple

import numpy as np

from . import cpu
from ._batchnorm import normalize_with
from ._checks import check_forward, check_moments, of_x, per_channel, too_few_values


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


def batch_moments(device, x, axis):
    """The ``Moments`` of a checked x (NumPy or device view) on ``device``, as host arrays."""
    x3, = device.operands(device.view(x, axis), x)
    shift, delta, m2 = device.moments(x3)
    count = np.full(x3.shape[1], float(x3.shape[0] * x3.shape[2]))
    return Moments(count, device.to_host(shift) + device.to_host(delta), device.to_host(m2))


def moments(x, *, axis=1, device=None, stream=None):
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
    stream : CUDA stream, optional
        As for ``forward``.

    Returns
    -------
    Moments
        float64 NumPy arrays of shape (C,), wherever x lives (3·C numbers, to merge or send).
    """
    return batch_moments(*check_moments(x, axis, device, stream))


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
    parts = [per_channel(f"{name}.{field}", a, channels, where)
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
    return merge([first] + [_as_moments(f"parts[{k}]", part, first.mean.shape[0], where)
                            for k, part in enumerate(parts[1:], 1)])


def merge(parts):
    """merge_moments of checked parts, with the CPU's Chan merge (fastbn.cpu.chan)."""
    return Moments(*cpu.merge(*(np.stack(field) for field in zip(*parts))))


def variances(total):
    """``(mean, biased variance, unbiased variance)`` of merged ``Moments``."""
    return total.mean, total.m2 / total.count, total.m2 / (total.count - 1)


def normalize(x, moments, gamma=None, beta=None, *, axis=1, running_mean=None, running_var=None,
              momentum=0.1, eps=1e-5, out=None, device=None, stream=None):
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
    gamma, beta, axis, running_mean, running_var, momentum, eps, out, device, stream
        As for ``forward``.

    Returns
    -------
    y : ndarray
    stats : BatchStats
        The mean and invstd used.
    """
    call = check_forward(x, gamma, beta, axis, True, running_mean, running_var, momentum, eps,
                         out, device, own_statistics=False, stream=stream)
    channels = call.x.shape[call.axis]
    total = _as_moments("moments", moments, channels, of_x(call.x, call.axis))
    if channels and total.count.min() < 2:
        raise too_few_values(total.count.min(), "moments (the whole batch)", " for some channel")
    return normalize_with(call, *variances(total))
