"""``BatchNorm``: a batch-norm layer for NumPy training loops, step for step ``torch.nn.BatchNorm*d``."""
import numbers

import numpy as np

from ._arrays import device_view, is_cuda_array
from ._internal import DATA_DTYPES, activation_value, backward, eps_value, forward


class BatchNorm:
    """Batch normalization over every axis of the input but the channel ``axis``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    axis : int
        The channel axis of the inputs (1 for N×C, N×C×L, N×C×H×W; -1 for channels-last).
    eps : float
        Added to the variance.
    momentum : float in [0, 1] or None
        Weight of the batch in the running statistics; ``None`` means a cumulative average
        (the weight is ``1 / num_batches_tracked``).
    affine : bool
        Whether the layer has a learnable scale ``gamma`` and shift ``beta``.
    track_running_stats : bool
        Whether the layer keeps running statistics. Without them it normalizes with the
        batch's statistics in eval mode too.
    dtype : float32 or float64
        The dtype of the parameters and running statistics.
    stream : CUDA stream, optional
        The stream the layer's GPU calls run on (attribute ``stream``, which may be changed
        between calls); see ``fastbn.forward``. Ignored on the CPU.
    activation : {None, "relu"}
        Fused after the normalization (and the residual, if the call passes one):
        ``bn(x, residual)`` is ``relu(BN(x) + residual)`` in one pass. The layer keeps y for
        the backward pass's mask: do not modify it in place before ``backward``.

    Attributes
    ----------
    gamma, beta : ndarray (C,) or None
        The parameters (None without ``affine``); update them in place in the training loop.
    running_mean, running_var : ndarray (C,) or None
        The running statistics (None without ``track_running_stats``).
    num_batches_tracked : int or None
        Training steps taken with running statistics.
    training : bool
        Training mode (batch statistics) or eval mode (running statistics).
    """

    def __init__(self, num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, stream=None, activation=None):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        if momentum is not None and (isinstance(momentum, bool)
                                     or not isinstance(momentum, numbers.Real)
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be None or a number in [0, 1], got {momentum!r}")
        activation_value(activation)
        dtype = np.dtype(dtype)
        if dtype not in DATA_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        channels = int(num_features)
        self.num_features = channels
        self.axis = int(axis)
        self.eps = eps_value(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.gamma = np.ones(channels, dtype) if affine else None
        self.beta = np.zeros(channels, dtype) if affine else None
        self.running_mean = np.zeros(channels, dtype) if track_running_stats else None
        self.running_var = np.ones(channels, dtype) if track_running_stats else None
        self.num_batches_tracked = 0 if track_running_stats else None
        self.stream = stream
        self.activation = activation
        self.training = True
        self.dgamma = self.dbeta = None
        # (x, stats, whether the statistics were the batch's, y if the layer has a ReLU, whether
        # the call had a residual)
        self._saved = None

    def __repr__(self):
        activation = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"{type(self).__name__}({self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}{activation})")

    # -- modes ----------------------------------------------------------------------------------

    def train(self, mode=True):
        """Set training mode (``mode=False``: eval mode); returns the layer."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set eval mode; returns the layer."""
        return self.train(False)

    # -- forward and backward -------------------------------------------------------------------

    def __call__(self, x, residual=None):
        return self.forward(x, residual)

    def forward(self, x, residual=None):
        """``y`` for the batch ``x``, ``act(BN(x) + residual)`` with the layer's activation and a
        residual (x's shape) if given; in training mode, also updates the running statistics."""
        batch_stats = self.training or not self.track_running_stats
        updating = self.training and self.track_running_stats
        momentum = self.momentum
        if updating and momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)  # the cumulative average
        running = (self.running_mean, self.running_var) if self.track_running_stats and \
            (updating or not batch_stats) else (None, None)
        y, stats = self._forward(x, self.gamma, self.beta, self.axis, batch_stats, running[0],
                                 running[1], 0.0 if momentum is None else momentum, self.eps,
                                 residual, self.activation)
        if updating:
            self.num_batches_tracked += 1
        self._saved = x, stats, batch_stats, None if self.activation is None else y, \
            residual is not None
        return y

    def backward(self, dy):
        """``dx`` for ``dy = ∂loss/∂y`` of the last forward, or ``(dx, dresidual)`` if that
        forward had a residual; ``grads()`` then holds dgamma, dbeta."""
        if self._saved is None:
            raise RuntimeError("backward needs a forward first: it differentiates the last one")
        x, stats, batch_stats, y, had_residual = self._saved
        dresidual = _empty_like(dy, x) if had_residual else None
        dx, dgamma, dbeta = self._backward(dy, x, stats, self.gamma, self.axis, batch_stats,
                                           self.activation, y, dresidual)
        if self.affine:
            self.dgamma, self.dbeta = dgamma, dbeta
        return dx if dresidual is None else (dx, dresidual)

    # What SyncBatchNorm replaces. Positional, and keywords spelled out: a training step calls
    # these twice, and packing and unpacking **options costs a small tensor's microsecond.
    def _forward(self, x, gamma, beta, axis, training, running_mean, running_var, momentum, eps,
                 residual, activation):
        return forward(x, gamma, beta, axis=axis, training=training, running_mean=running_mean,
                       running_var=running_var, momentum=momentum, eps=eps, stream=self.stream,
                       residual=residual, activation=activation)

    def _backward(self, dy, x, stats, gamma, axis, training, activation, y, dresidual):
        return backward(dy, x, stats, gamma, axis=axis, training=training, stream=self.stream,
                        activation=activation, y=y, dresidual=dresidual)

    def params(self):
        """``{"gamma": ..., "beta": ...}`` (the arrays themselves), or ``{}`` without affine."""
        return {"gamma": self.gamma, "beta": self.beta} if self.affine else {}

    def grads(self):
        """``{"gamma": dgamma, "beta": dbeta}`` of the last backward, or ``{}`` without affine."""
        return {"gamma": self.dgamma, "beta": self.dbeta} if self.affine else {}

    # -- checkpoints, with PyTorch's key names ---------------------------------------------------

    def _arrays(self):
        names = {}
        if self.affine:
            names.update(weight=self.gamma, bias=self.beta)
        if self.track_running_stats:
            names.update(running_mean=self.running_mean, running_var=self.running_var)
        return names

    def state_dict(self):
        """Copies of the layer's state, keyed as PyTorch's ``state_dict`` keys it."""
        state = {name: a.copy() for name, a in self._arrays().items()}
        if self.track_running_stats:
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, np.int64)
        return state

    def load_state_dict(self, state):
        """Load ``state`` (PyTorch's keys; arrays or anything NumPy converts, e.g. tensors' .numpy()).

        Every key must be there, with the right shape, and no other: otherwise a ValueError, and
        the layer is left as it was.
        """
        arrays = self._arrays()
        expected = set(arrays) | ({"num_batches_tracked"} if self.track_running_stats else set())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"state dict keys do not match the layer: missing "
                             f"{sorted(missing)}, unexpected {sorted(unexpected)}")
        values = {}
        for name, target in arrays.items():
            value = np.asarray(state[name])
            if value.shape != target.shape or value.dtype.kind not in "fiu":
                raise ValueError(f"state dict entry {name!r} must be a real array of shape "
                                 f"{target.shape}, got dtype {value.dtype}, shape {value.shape}")
            values[name] = value
        if self.track_running_stats:
            count = np.asarray(state["num_batches_tracked"])
            if count.shape not in ((), (1,)) or count.dtype.kind not in "iu":
                raise ValueError(f"state dict entry 'num_batches_tracked' must be an integer, "
                                 f"got dtype {count.dtype}, shape {count.shape}")
            self.num_batches_tracked = int(count.reshape(()))
        for name, target in arrays.items():
            target[...] = values[name]


def _empty_like(dy, x):
    """A new array for dresidual, where dy lives, laid out like x (backward checks the shapes)."""
    if is_cuda_array(dy):
        from numba import cuda
        view = device_view(dy, "dy")
        return cuda.device_array(view.shape, view.dtype)
    return np.empty_like(x, dtype=np.asarray(dy).dtype)


class _FixedRank(BatchNorm):
    """BatchNorm for inputs of the ranks PyTorch's class of the same name accepts."""

    ranks = ()

    def forward(self, x, residual=None):
        ndim = np.ndim(x)
        if ndim not in self.ranks:
            raise ValueError(f"{type(self).__name__} takes inputs of {' or '.join(map(str, self.ranks))} "
                             f"dimensions, got shape {np.shape(x)}")
        return super().forward(x, residual)


class BatchNorm1d(_FixedRank):
    """``BatchNorm`` for N×C or N×C×L inputs, as ``torch.nn.BatchNorm1d``."""

    ranks = (2, 3)


class BatchNorm2d(_FixedRank):
    """``BatchNorm`` for N×C×H×W inputs, as ``torch.nn.BatchNorm2d``."""

    ranks = (4,)


class BatchNorm3d(_FixedRank):
    """``BatchNorm`` for N×C×D×H×W inputs, as ``torch.nn.BatchNorm3d``."""

    ranks = (5,)
