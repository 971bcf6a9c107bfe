"""Eval-mode batch norm folded: into one multiply-add per channel (``inference_affine``), or into
the weights of the layer before it (``fold``). The folded form trades digits for speed when
|mean| ≫ std (docs/design.md §3); ``forward(training=False)`` keeps them."""
import numpy as np

from ._checks import eps_value, per_channel


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
    gamma, beta, mean, var = (per_channel(name, a, shape[0], where) for name, a in given.items())
    eps = eps_value(eps)
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
