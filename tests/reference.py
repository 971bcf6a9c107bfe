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


# -- the normalization family: the same equations over another grouping -----------------------
#
# Each op normalizes rows of x (below, ``x`` reshaped to ``(rows, values)``) and scales element
# ``(row, k)`` by ``gamma`` at a parameter index ``param[row, k]``:
#
#   layer norm   rows: the leading axes; values: normalized_shape;   parameter: k
#   group norm   rows: (N, G); values: (C/G, spatial);               parameter: its channel
#   instance     rows: (N, C); values: spatial;                      parameter: its channel
#   RMS norm     as layer norm, with mean 0 (no centring):  x_hat = x / sqrt(mean(x²) + eps)


def _param_index(shape, kind, groups=None):
    """``(rows, values)`` and the parameter index of every element, for an op on ``shape``."""
    if kind == "layer":
        lead, k = shape
        rows = int(np.prod(lead))
        size = int(np.prod(k))
        return (rows, size), np.broadcast_to(np.arange(size), (rows, size))
    n, c = shape[0], shape[1]
    spatial = int(np.prod(shape[2:]))
    channel = np.broadcast_to(np.arange(c)[None, :, None], (n, c, spatial))
    return (n * groups, c // groups * spatial), channel.reshape(n * groups, -1)


def _affine(kind, x_shape, groups, normalized_ndim, gamma, beta):
    """``(rows, values)``, and gamma and beta at every element of x as ``(rows, values)``."""
    shape = _affine_shape(kind, x_shape, normalized_ndim)
    size = int(np.prod(shape[1])) if kind == "layer" else x_shape[1]
    g = np.ones(size) if gamma is None else np.asarray(gamma, np.float64).reshape(-1)
    b = np.zeros(size) if beta is None else np.asarray(beta, np.float64).reshape(-1)
    (rows, values), index = _param_index(shape, kind, groups)
    return (rows, values), g[index], b[index]


def _row_statistics(r, eps, centred):
    if centred:
        s = r[:, :1]
        d = r - s
        mean_d = d.mean(axis=1, keepdims=True)
        var = ((d - mean_d) ** 2).mean(axis=1)
        return (s + mean_d)[:, 0], var, 1.0 / np.sqrt(var + eps)
    ms = (r * r).mean(axis=1)
    return None, ms, 1.0 / np.sqrt(ms + eps)


def normalize(x, kind, eps, gamma=None, beta=None, groups=1, normalized_ndim=1, centred=True,
              mean=None, invstd=None):
    """``(y, mean, var, invstd)`` in float64, with per-row statistics of shape ``(rows,)``
    (``mean`` None for RMS norm; ``var`` the biased variance, or the mean square). Given
    ``mean`` and ``invstd`` (instance norm in eval), they are used instead of x's."""
    x = np.asarray(x, np.float64)
    (rows, values), g, b = _affine(kind, x.shape, groups, normalized_ndim, gamma, beta)
    r = x.reshape(rows, values)
    if invstd is None:
        mean, var, invstd = _row_statistics(r, eps, centred)
    else:
        var = 1.0 / np.asarray(invstd, np.float64) ** 2 - eps
    centre = 0.0 if mean is None else np.asarray(mean, np.float64).reshape(rows, 1)
    xhat = (r - centre) * np.asarray(invstd, np.float64).reshape(rows, 1)
    return (g * xhat + b).reshape(x.shape), mean, var, invstd


def normalize_backward(dy, x, mean, invstd, kind, gamma=None, groups=1, normalized_ndim=1,
                       training=True):
    """``(dx, dgamma, dbeta)`` in float64 for the op ``normalize`` ran (mean None: RMS norm):
    ``dx = invstd·(g − mean(g) − x̂·mean(g·x̂))`` per row with ``g = γ·dy`` (no ``mean(g)`` term
    for RMS norm; ``γ·invstd·dy`` when the statistics were constants), ``dgamma = Σ dy·x̂`` and
    ``dbeta = Σ dy`` per parameter."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    (rows, values), g, _ = _affine(kind, x.shape, groups, normalized_ndim, gamma, None)
    r = x.reshape(rows, values)
    d = dy.reshape(rows, values)
    invstd = np.asarray(invstd, np.float64).reshape(rows, 1)
    centre = 0.0 if mean is None else np.asarray(mean, np.float64).reshape(rows, 1)
    xhat = (r - centre) * invstd
    gd = g * d
    if not training:
        dx = invstd * gd
    elif mean is None:
        dx = invstd * (gd - xhat * (gd * xhat).mean(axis=1, keepdims=True))
    else:
        dx = invstd * (gd - gd.mean(axis=1, keepdims=True)
                       - xhat * (gd * xhat).mean(axis=1, keepdims=True))
    _, index = _param_index(_affine_shape(kind, x.shape, normalized_ndim), kind, groups)
    size = g.shape[1] if kind == "layer" else x.shape[1]
    dgamma = np.bincount(index.reshape(-1), (d * xhat).reshape(-1), size)
    dbeta = np.bincount(index.reshape(-1), d.reshape(-1), size)
    return dx.reshape(x.shape), dgamma, dbeta


def _affine_shape(kind, x_shape, normalized_ndim):
    if kind == "layer":
        k = len(x_shape) - normalized_ndim
        return (x_shape[:k], x_shape[k:])
    return x_shape
