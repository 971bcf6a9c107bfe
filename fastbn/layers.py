"""Normalization layers for NumPy training loops, step for step their ``torch.nn`` namesakes:
``BatchNorm`` (and ``BatchNorm1d/2d/3d``), ``LayerNorm``, ``GroupNorm``,
``InstanceNorm1d/2d/3d`` and ``RMSNorm``. Each is called on a batch (``y = layer(x)``), then
``dx = layer.backward(dy)``; ``params()`` and ``grads()`` give the parameters and their
gradients, ``state_dict()`` uses PyTorch's keys."""
import math
import numbers

import numpy as np

from . import _norms
from ._arrays import device_view, is_cuda_array
from ._internal import DATA_DTYPES, activation_value, backward, eps_value, forward

# What the ops' errors for too little data in training say (fastbn._checks.too_few_values,
# fastbn._norms.instance_norm): a layer recognizes them by it, and adds what to do.
_TOO_FEW_VALUES = "more than one value per channel"
_TOO_FEW_SPATIAL = "more than one spatial value per channel"


class _Layer:
    """What every layer shares: modes, parameters and gradients, checkpoints.

    A subclass sets ``affine``, ``gamma``, ``beta`` (None where absent), ``track_running_stats``
    with ``running_mean``, ``running_var``, ``num_batches_tracked``, and ``training``.
    """

    affine = False
    track_running_stats = False
    gamma = beta = dgamma = dbeta = None

    # -- modes ----------------------------------------------------------------------------------

    def train(self, mode=True):
        """Set training mode (``mode=False``: eval mode); returns the layer."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set eval mode; returns the layer."""
        return self.train(False)

    def __call__(self, x):
        return self.forward(x)

    def params(self):
        """``{"gamma": ..., "beta": ...}`` (the arrays themselves; only those the layer has), or
        ``{}`` without affine."""
        return {name: a for name, a in (("gamma", self.gamma), ("beta", self.beta))
                if a is not None} if self.affine else {}

    def grads(self):
        """The gradients of ``params()``'s arrays from the last backward, keyed alike."""
        return {name: g for name, a, g in (("gamma", self.gamma, self.dgamma),
                                           ("beta", self.beta, self.dbeta))
                if a is not None} if self.affine else {}

    # -- checkpoints, with PyTorch's key names ---------------------------------------------------

    def _arrays(self):
        names = {}
        if self.affine:
            names.update((name, a) for name, a in (("weight", self.gamma), ("bias", self.beta))
                         if a is not None)
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


def _layer_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in DATA_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class BatchNorm(_Layer):
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
        channels = _positive("num_features", num_features)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        if momentum is not None and (isinstance(momentum, bool)
                                     or not isinstance(momentum, numbers.Real)
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be None or a number in [0, 1], got {momentum!r}")
        activation_value(activation)
        dtype = _layer_dtype(dtype)
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

    def _name(self):
        """The layer as error messages name it: as constructed, the main arguments."""
        axis = "" if self.axis == 1 else f", axis={self.axis}"
        return f"{type(self).__name__}({self.num_features}{axis})"

    def _check_features(self, shape):
        """Raise if x (of ``shape``) lacks ``num_features`` channels on the channel axis; an x
        without that axis is left to the op, whose error says so."""
        ndim, axis, features = len(shape), self.axis, self.num_features
        if ndim < 2 or not -ndim <= axis < ndim or shape[axis] == features:
            return
        hint = ""
        if axis % ndim != ndim - 1 and shape[-1] == features:
            hint = "; if x's channels are on its last axis, construct the layer with axis=-1"
        elif axis % ndim != 1 and shape[1] == features:
            hint = "; if x's channels are on axis 1, construct the layer with axis=1"
        raise ValueError(f"{self._name()} expects {features} features on axis {axis}, but x of "
                         f"shape {shape} has {shape[axis]} there{hint}")

    def _single_sample_hint(self):
        if self.track_running_stats:
            return ("to normalize a single sample with the running statistics, call the layer's "
                    ".eval() first")
        return ("eval mode would not help: without running statistics "
                "(track_running_stats=False) the layer normalizes with the batch's statistics "
                "in eval mode too")

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
        try:
            y, stats = self._forward(x, self.gamma, self.beta, self.axis, batch_stats,
                                     running[0], running[1], 0.0 if momentum is None else momentum,
                                     self.eps, residual, self.activation)
        except ValueError as error:
            if not (batch_stats and _TOO_FEW_VALUES in str(error)):
                raise
            raise ValueError(f"{self._name()}: {error}; {self._single_sample_hint()}") from None
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
        # x's channel count is checked here and not in forward: SyncBatchNorm's op is
        # collective, and its errors must reach the other ranks through it.
        shape = x.shape if type(x) is np.ndarray else _shape_of(x)
        if not -len(shape) <= axis < len(shape) or shape[axis] != self.num_features:
            self._check_features(shape)
        return forward(x, gamma, beta, axis=axis, training=training, running_mean=running_mean,
                       running_var=running_var, momentum=momentum, eps=eps, stream=self.stream,
                       residual=residual, activation=activation)

    def _backward(self, dy, x, stats, gamma, axis, training, activation, y, dresidual):
        return backward(dy, x, stats, gamma, axis=axis, training=training, stream=self.stream,
                        activation=activation, y=y, dresidual=dresidual)


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


# -- the normalization family ------------------------------------------------------------------


class _Family(_Layer):
    """A layer of the family: ``forward`` runs the op and keeps what ``backward`` needs."""

    stream = None

    def _remember(self, x, result, training=True):
        y, stats = result
        self._saved = x, stats, training
        return y

    def _last(self):
        if self._saved is None:
            raise RuntimeError("backward needs a forward first: it differentiates the last one")
        return self._saved

    def _store(self, dgamma, dbeta=None):
        if self.affine:
            self.dgamma = dgamma
            if self.beta is not None:
                self.dbeta = dbeta


def _shape_of(x):
    """x's shape, read without copying x: a CUDA array's own ``shape`` where it has one (a
    Numba view of it costs microseconds)."""
    if is_cuda_array(x):
        shape = getattr(x, "shape", None)
        return tuple(device_view(x).shape if shape is None else shape)
    return tuple(np.shape(x))


def _last_axes_error(layer, shape):
    """The error for an x (of ``shape``) that does not end in the layer's ``normalized_shape``."""
    expected = layer.normalized_shape
    k, ndim = len(expected), len(shape)
    if k == 1:
        wanted = f"{expected[0]} features on x's last axis (normalized_shape {expected})"
    else:
        wanted = f"x's last {k} axes to be {expected} (normalized_shape)"
    if ndim < k:
        found = f"has only {ndim} ax{'i' if ndim == 1 else 'e'}s"
    else:
        found = f"has {shape[-1] if k == 1 else shape[-k:]} there"
    return ValueError(f"{layer._name()} expects {wanted}, but x of shape {shape} {found}")


def _shape(normalized_shape):
    shape = _norms._shape_argument(normalized_shape)
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"normalized_shape must be one or more positive sizes, got "
                         f"{normalized_shape!r}")
    return shape


class LayerNorm(_Family):
    """Layer normalization over the last axes, as ``torch.nn.LayerNorm``.

    Parameters
    ----------
    normalized_shape : int or tuple of ints
        The trailing axes of the inputs normalized over.
    eps : float
        Added to the variance.
    elementwise_affine : bool
        Whether the layer has a learnable ``gamma`` (ones) and ``beta`` (zeros) of
        ``normalized_shape``.
    bias : bool
        Whether it has ``beta`` (with ``elementwise_affine``).
    dtype : float32 or float64
        The parameters' dtype.
    stream : CUDA stream, optional
        As ``BatchNorm``'s.

    ``y = ln(x)``, ``dx = ln.backward(dy)``; ``params()``/``grads()`` are keyed ``"gamma"``,
    ``"beta"``; ``state_dict()`` has PyTorch's ``weight`` and ``bias``. Training and eval
    modes compute alike (``train``/``eval`` are there for a model's sake).
    """

    def __init__(self, normalized_shape, *, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=np.float32, stream=None):
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps_value(eps)
        dtype = _layer_dtype(dtype)
        self.affine = self.elementwise_affine = bool(elementwise_affine)
        self.gamma = np.ones(self.normalized_shape, dtype) if self.affine else None
        self.beta = np.zeros(self.normalized_shape, dtype) if self.affine and bias else None
        self.stream = stream
        self.training = True
        self._saved = None

    def __repr__(self):
        return (f"{type(self).__name__}({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.affine}, bias={self.beta is not None})")

    def _name(self):
        shape = self.normalized_shape
        return f"{type(self).__name__}({shape[0] if len(shape) == 1 else shape})"

    def forward(self, x):
        """``y``: each sample normalized over the last axes, scaled and shifted."""
        shape = x.shape if type(x) is np.ndarray else _shape_of(x)
        if shape[-len(self.normalized_shape):] != self.normalized_shape:
            raise _last_axes_error(self, shape)
        return self._remember(x, _norms.layer_norm(x, self.normalized_shape, self.gamma,
                                                   self.beta, eps=self.eps, stream=self.stream))

    def backward(self, dy):
        """``dx`` for ``dy`` of the last forward; ``grads()`` then holds dgamma, dbeta."""
        x, stats, _ = self._last()
        dx, dgamma, dbeta = _norms.layer_norm_backward(dy, x, stats, self.normalized_shape,
                                                       self.gamma, stream=self.stream)
        self._store(dgamma, dbeta)
        return dx


class RMSNorm(_Family):
    """RMS normalization over the last axes, as ``torch.nn.RMSNorm``: ``LayerNorm``'s interface
    with a scale ``gamma`` only (key ``weight``), and ``eps=None`` meaning the input dtype's
    machine epsilon."""

    def __init__(self, normalized_shape, *, eps=None, elementwise_affine=True, dtype=np.float32,
                 stream=None):
        self.normalized_shape = _shape(normalized_shape)
        self.eps = None if eps is None else eps_value(eps)
        dtype = _layer_dtype(dtype)
        self.affine = self.elementwise_affine = bool(elementwise_affine)
        self.gamma = np.ones(self.normalized_shape, dtype) if self.affine else None
        self.stream = stream
        self.training = True
        self._saved = None

    def __repr__(self):
        return (f"{type(self).__name__}({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.affine})")

    _name = LayerNorm._name

    def forward(self, x):
        """``y = γ·x / sqrt(mean(x²) + eps)`` over the last axes."""
        shape = x.shape if type(x) is np.ndarray else _shape_of(x)
        if shape[-len(self.normalized_shape):] != self.normalized_shape:
            raise _last_axes_error(self, shape)
        return self._remember(x, _norms.rms_norm(x, self.normalized_shape, self.gamma,
                                                 eps=self.eps, stream=self.stream))

    def backward(self, dy):
        """``dx`` for ``dy`` of the last forward; ``grads()`` then holds dgamma."""
        x, stats, _ = self._last()
        dx, dgamma = _norms.rms_norm_backward(dy, x, stats, self.normalized_shape, self.gamma,
                                              stream=self.stream)
        self._store(dgamma)
        return dx


class GroupNorm(_Family):
    """Group normalization, as ``torch.nn.GroupNorm``: the ``num_channels`` channels (axis 1) cut
    into ``num_groups`` groups, each normalized per sample over its channels and spatial axes;
    ``gamma`` (ones) and ``beta`` (zeros) per channel with ``affine``. Interface as
    ``LayerNorm``'s."""

    def __init__(self, num_groups, num_channels, *, eps=1e-5, affine=True, dtype=np.float32,
                 stream=None):
        self.num_groups = _positive("num_groups", num_groups)
        self.num_channels = _positive("num_channels", num_channels)
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_channels {num_channels} must be divisible by num_groups "
                             f"{num_groups}")
        self.eps = eps_value(eps)
        dtype = _layer_dtype(dtype)
        self.affine = bool(affine)
        self.gamma = np.ones(self.num_channels, dtype) if self.affine else None
        self.beta = np.zeros(self.num_channels, dtype) if self.affine else None
        self.stream = stream
        self.training = True
        self._saved = None

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine})")

    def _name(self):
        return f"{type(self).__name__}({self.num_groups}, {self.num_channels})"

    def forward(self, x):
        """``y``: each group of channels of each sample normalized, scaled and shifted."""
        shape = x.shape if type(x) is np.ndarray else _shape_of(x)
        if len(shape) >= 2 and shape[1] != self.num_channels:  # fewer axes: the op says so
            raise ValueError(f"{self._name()} expects {self.num_channels} channels on axis 1, "
                             f"but x of shape {shape} has {shape[1]} there")
        return self._remember(x, _norms.group_norm(x, self.num_groups, self.gamma, self.beta,
                                                   eps=self.eps, stream=self.stream))

    def backward(self, dy):
        """``dx`` for ``dy`` of the last forward; ``grads()`` then holds dgamma, dbeta."""
        x, stats, _ = self._last()
        dx, dgamma, dbeta = _norms.group_norm_backward(dy, x, stats, self.num_groups, self.gamma,
                                                       stream=self.stream)
        self._store(dgamma, dbeta)
        return dx


class _InstanceNorm(_Family):
    """Instance normalization, as ``torch.nn.InstanceNorm*d``: each channel of each sample
    normalized over its spatial axes.

    Parameters
    ----------
    num_features : int
        C.
    eps : float
    momentum : float in [0, 1] or None
        The running statistics' update weight (None: no update, as PyTorch's InstanceNorm).
    affine : bool
        Whether the layer has ``gamma`` (ones) and ``beta`` (zeros) per channel.
    track_running_stats : bool
        Whether it keeps running statistics, and normalizes with them in eval mode (without
        them it uses each instance's statistics in eval mode too). ``num_batches_tracked`` is
        kept for the state dict, and stays 0 as in PyTorch.
    dtype, stream
        As ``BatchNorm``'s.
    """

    ranks = ()

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, dtype=np.float32, stream=None):
        channels = _positive("num_features", num_features)
        if momentum is not None and (isinstance(momentum, bool)
                                     or not isinstance(momentum, numbers.Real)
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be None or a number in [0, 1], got {momentum!r}")
        dtype = _layer_dtype(dtype)
        self.num_features = channels
        self.eps = eps_value(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.gamma = np.ones(channels, dtype) if self.affine else None
        self.beta = np.zeros(channels, dtype) if self.affine else None
        self.running_mean = np.zeros(channels, dtype) if self.track_running_stats else None
        self.running_var = np.ones(channels, dtype) if self.track_running_stats else None
        self.num_batches_tracked = 0 if self.track_running_stats else None
        self.stream = stream
        self.training = True
        self._saved = None

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats})")

    def _name(self):
        return f"{type(self).__name__}({self.num_features})"

    def forward(self, x):
        """``y``; in training mode with running statistics, also updates them."""
        shape = x.shape if type(x) is np.ndarray else _shape_of(x)
        if len(shape) not in self.ranks:
            raise ValueError(f"{type(self).__name__} takes inputs of {self.ranks[0]} dimensions "
                             f"(N, C, spatial...), got shape {tuple(shape)}")
        if shape[1] != self.num_features:
            raise ValueError(f"{self._name()} expects {self.num_features} features on axis 1, "
                             f"but x of shape {shape} has {shape[1]} there")
        own = self.training or not self.track_running_stats
        running = self.track_running_stats and (self.training or not own)
        try:
            result = _norms.instance_norm(
                x, self.gamma, self.beta, eps=self.eps,
                running_mean=self.running_mean if running else None,
                running_var=self.running_var if running else None, training=own,
                momentum=0.0 if self.momentum is None else self.momentum, stream=self.stream)
        except ValueError as error:
            if not (own and _TOO_FEW_SPATIAL in str(error)):
                raise
            raise self._one_value_error(shape) from None
        return self._remember(x, result, own)

    def _one_value_error(self, shape):
        found = (f"needs more than one spatial value per channel, but x of shape {shape} has "
                 f"{math.prod(shape[2:])}")
        if self.track_running_stats:
            return ValueError(f"{self._name()} in training {found}; to normalize with the running "
                              f"statistics instead, call the layer's .eval() first")
        return ValueError(f"{self._name()} normalizes each channel of each sample with its own "
                          f"statistics, in eval mode too (it has no running statistics: "
                          f"track_running_stats=False), and {found}")

    def backward(self, dy):
        """``dx`` for ``dy`` of the last forward; ``grads()`` then holds dgamma, dbeta."""
        x, stats, own = self._last()
        dx, dgamma, dbeta = _norms.instance_norm_backward(dy, x, stats, self.gamma,
                                                          training=own, stream=self.stream)
        self._store(dgamma, dbeta)
        return dx


class InstanceNorm1d(_InstanceNorm):
    """``InstanceNorm`` for N×C×L inputs, as ``torch.nn.InstanceNorm1d`` (batched)."""

    ranks = (3,)


class InstanceNorm2d(_InstanceNorm):
    """``InstanceNorm`` for N×C×H×W inputs, as ``torch.nn.InstanceNorm2d`` (batched)."""

    ranks = (4,)


class InstanceNorm3d(_InstanceNorm):
    """``InstanceNorm`` for N×C×D×H×W inputs, as ``torch.nn.InstanceNorm3d`` (batched)."""

    ranks = (5,)
