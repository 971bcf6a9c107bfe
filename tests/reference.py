"""Plain float64 NumPy reference for batch normalization, written from the paper's equations.

    mu      = 1/m  sum_i x_i                    (mini-batch mean)
    var     = 1/m  sum_i (x_i - mu)^2           (mini-batch variance, biased)
    x_hat_i = (x_i - mu) / sqrt(var + eps)      (normalize)
    y_i     = gamma * x_hat_i + beta            (scale and shift)

Inference uses the running (population) statistics; the running variance is updated with the
unbiased batch variance m/(m-1) * var, with PyTorch's momentum convention.

The batch statistics are computed on x - s, where s is one sample of the channel: mathematically
identical, and exact even when |mean| >> std (no catastrophic cancellation).
Everything here is float64; it is the yardstick for every kernel, not fast.
"""
import numpy as np


def _rows(a, axis):
    """View of a as (m, C): the channel axis last, every other axis flattened into rows."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    return a.reshape(-1, a.shape[-1])


def _unrows(r, shape, axis):
    """Inverse of _rows for an array of the given original shape."""
    ax = axis % len(shape)
    moved = shape[:ax] + shape[ax + 1:] + (shape[ax],)
    return np.moveaxis(r.reshape(moved), -1, axis)


def forward(x, gamma=None, beta=None, axis=1, training=True, running_mean=None,
            running_var=None, momentum=0.1, eps=1e-5):
    """Returns (y, mean, invstd, new_running_mean, new_running_var), all float64.

    new_running_* are None when no running statistics are given; in eval mode they are the
    given running statistics (as float64), unchanged.
    """
    x = np.asarray(x)
    r = _rows(x, axis)
    m, c = r.shape
    g = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
    b = np.zeros(c) if beta is None else np.asarray(beta, dtype=np.float64)
    rm = None if running_mean is None else np.asarray(running_mean, dtype=np.float64)
    rv = None if running_var is None else np.asarray(running_var, dtype=np.float64)

    if training:
        s = r[0]                                  # one sample of each channel
        d = r - s                                 # shifted data
        mean_d = d.mean(axis=0)
        var = ((d - mean_d) ** 2).mean(axis=0)    # biased variance
        mean = s + mean_d
        invstd = 1.0 / np.sqrt(var + eps)
        xhat = (d - mean_d) * invstd
        if rm is not None:
            unbiased = var * m / (m - 1)
            rm = (1.0 - momentum) * rm + momentum * mean
            rv = (1.0 - momentum) * rv + momentum * unbiased
    else:
        mean = rm.copy()
        invstd = 1.0 / np.sqrt(rv + eps)
        xhat = (r - mean) * invstd

    y = g * xhat + b
    return _unrows(y, x.shape, axis), mean, invstd, rm, rv


def backward(dy, x, mean, invstd, gamma=None, axis=1, training=True):
    """Returns (dx, dgamma, dbeta), all float64, for the statistics (mean, invstd) given.

    dgamma = sum dy * x_hat, dbeta = sum dy.
    Training (gradient through the batch statistics):
        dx = gamma * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))
    Eval (statistics are constants):
        dx = gamma * invstd * dy
    """
    x = np.asarray(x)
    r = _rows(x, axis)
    g = _rows(dy, axis)
    c = r.shape[1]
    gam = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    invstd = np.asarray(invstd, dtype=np.float64)

    xhat = (r - mean) * invstd
    dbeta = g.sum(axis=0)
    dgamma = (g * xhat).sum(axis=0)
    if training:
        dx = gam * invstd * (g - g.mean(axis=0) - xhat * (g * xhat).mean(axis=0))
    else:
        dx = gam * invstd * g
    return _unrows(dx, x.shape, axis), dgamma, dbeta


def moments(x, axis=1):
    """(count, mean, M2) per channel, float64: M2 = Σ(x − mean)², by the shifted two-pass."""
    r = _rows(x, axis)
    if r.shape[0] == 0:
        return np.zeros(r.shape[1]), np.zeros(r.shape[1]), np.zeros(r.shape[1])
    d = r - r[0]
    mean_d = d.mean(axis=0)
    return np.full(r.shape[1], float(r.shape[0])), r[0] + mean_d, ((d - mean_d) ** 2).sum(axis=0)
