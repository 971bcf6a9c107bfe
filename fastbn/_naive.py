"""Batch norm in plain NumPy, as a NumPy user would write it.

The speed baseline of ``python -m fastbn`` and the benchmarks (run in x's dtype), and the quick
correctness check of ``python -m fastbn`` (run in float64). The tests use their own, independent
reference (tests/reference.py).
"""
import numpy as np


def _per_channel(a, x, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    return np.asarray(a).reshape(shape)


def forward(x, gamma, beta, axis, training, running_mean=None, running_var=None, eps=1e-5):
    """``(y, mean, invstd)``; gamma, beta of shape (C,)."""
    axis %= x.ndim
    reduced = tuple(a for a in range(x.ndim) if a != axis)
    if training:
        mean, var = x.mean(axis=reduced), x.var(axis=reduced)
    else:
        mean, var = running_mean.astype(x.dtype), running_var.astype(x.dtype)
    invstd = 1 / np.sqrt(var + eps)
    y = (x - _per_channel(mean, x, axis)) * _per_channel(gamma * invstd, x, axis)
    y += _per_channel(beta, x, axis)
    return y.astype(x.dtype, copy=False), mean, invstd


def backward(dy, x, mean, invstd, gamma, axis, training):
    """``(dx, dgamma, dbeta)`` for the y of ``forward``."""
    axis %= x.ndim
    reduced = tuple(a for a in range(x.ndim) if a != axis)
    count = x.size // x.shape[axis]
    xhat = (x - _per_channel(mean, x, axis)) * _per_channel(invstd, x, axis)
    dbeta = dy.sum(axis=reduced)
    dgamma = (dy * xhat).sum(axis=reduced)
    if training:
        dxhat = dy - _per_channel(dbeta / count, x, axis) - xhat * _per_channel(dgamma / count, x, axis)
    else:
        dxhat = dy
    dx = dxhat * _per_channel(gamma * invstd, x, axis)
    return dx.astype(x.dtype, copy=False), dgamma, dbeta
