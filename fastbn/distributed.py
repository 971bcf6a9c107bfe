"""Synchronized batch norm over MPI: every rank normalizes with the statistics of the global batch.

Data-parallel training gives each process a slice of the batch. ``forward`` and ``backward`` here
take the same arguments as ``fastbn.forward`` and ``fastbn.backward``, plus an mpi4py
communicator, and return what single-process batch norm returns on the concatenated batch:

* forward exchanges each rank's ``Moments(count, mean, M2)`` once (3·C numbers per rank) and
  merges them exactly with Chan's formula, in rank order, so every rank gets the same bits (not a
  round trip through ``invstd``, which loses digits); running statistics use the global unbiased
  variance;
* backward exchanges ``Σdy`` and ``Σdy·(x − μ)`` once (2·C + 1 numbers per rank) and adds them in
  rank order. It returns this rank's dx, and this rank's share of dgamma and dbeta: add them over
  the ranks, as for every other parameter's gradient in data-parallel training.

Ranks may hold different batch sizes, an empty one included. Every argument is checked before the
exchange, and the exchange carries each rank's verdict and its (ndim, axis, C, dtype): a bad
argument on one rank, or ranks that disagree, raise an error on every rank instead of leaving
the others waiting. In eval mode nothing is exchanged, so ``training`` must agree across ranks.
Run programs as ``mpiexec -n 4 python -m mpi4py train.py``, so that an error no check foresees
(out of memory mid-call) aborts every rank.

Needs mpi4py and an MPI library: ``pip install "fastbn[mpi]"`` (mpi4py and MPICH). Importing this
module initializes MPI.
"""
import types

import numpy as np

from . import _internal as internal
from .layers import BatchNorm

try:
    from mpi4py import MPI
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("fastbn.distributed needs mpi4py and an MPI library: "
                      "pip install \"fastbn[mpi]\"") from error

__all__ = ["forward", "backward", "SyncBatchNorm"]

# What SyncBatchNorm.convert does not look inside.
_NOT_MODELS = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
               types.ModuleType, np.ndarray, MPI.Comm)


def _communicator(comm):
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
    return comm


def _layout(x, axis):
    """What every rank must agree on: (ndim, channel axis, C, dtype)."""
    return x.ndim, axis, x.shape[axis], str(x.dtype)


def _exchange(comm, mine, failure=None):
    """Everyone's ``(layout, payload)``, in rank order, once every rank has agreed.

    ``failure`` is this rank's own error, if its checks failed: it is sent instead, and raised
    here after the exchange, so that no rank is left waiting. An error on another rank, or ranks
    that disagree on the layout, raise on every rank.
    """
    report = (type(failure).__name__, str(failure)) if failure is not None else mine
    everyone = comm.allgather((failure is not None, report))
    if failure is not None:
        raise failure
    failed = [(rank, report) for rank, (bad, report) in enumerate(everyone) if bad]
    if failed:
        rank, (kind, message) = failed[0]
        error = {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)
        raise error(f"rank {rank} of {comm.Get_size()} raised {kind}: {message}")
    layouts = [layout for _, (layout, _) in everyone]
    for what, k in (("number of dimensions", 0), ("channel axis", 1), ("channel count C", 2),
                    ("dtype", 3)):
        if len({layout[k] for layout in layouts}) > 1:
            each = ", ".join(f"rank {rank}: {layout[k]}" for rank, layout in enumerate(layouts))
            raise ValueError(f"the ranks disagree on x's {what} ({each}); each rank's x must "
                             f"be its slice of one global batch")
    return [payload for _, (_, payload) in everyone]


def forward(x, gamma=None, beta=None, *, axis=1, training=True, running_mean=None,
            running_var=None, momentum=0.1, eps=1e-5, out=None, device=None, comm=None,
            stream=None, residual=None, activation=None):
    """``fastbn.forward`` with the statistics of the global batch: every rank's x together.

    Parameters
    ----------
    x, gamma, beta, axis, training, running_mean, running_var, momentum, eps, out, device, stream
    residual, activation
        As for ``fastbn.forward`` (residual: this rank's slice). x is this rank's slice of the batch, any size (empty too);
        training needs more than one value per channel in the global batch. ``training`` must be
        the same on every rank.
    comm : mpi4py communicator, optional
        The ranks that share the batch; ``MPI.COMM_WORLD`` by default. Collective: every rank
        of ``comm`` must call.

    Returns
    -------
    y : ndarray
        This rank's slice of the normalized global batch.
    stats : BatchStats
        The global ``(mean, invstd)``, the same on every rank, for ``backward``.
    """
    comm = _communicator(comm)
    try:
        training = internal.flag("training", training)
        if training:
            call = internal.check_forward(x, gamma, beta, axis, True, running_mean, running_var,
                                          momentum, eps, out, device, own_statistics=False,
                                          stream=stream, residual=residual,
                                          activation=activation)
            mine = internal.batch_moments(call.device, call.x, call.axis)
    except Exception as error:  # the other ranks learn of it in the exchange, and raise too
        _exchange(comm, None, error)
    if not training:  # running statistics: nothing to exchange
        return internal.forward(x, gamma, beta, axis=axis, training=False, running_mean=running_mean,
                                running_var=running_var, momentum=momentum, eps=eps, out=out,
                                device=device, stream=stream, residual=residual,
                                activation=activation)
    # every rank's Moments, made by fastbn there, of one agreed layout: merged unchecked
    total = internal.merge(_exchange(comm, (_layout(call.x, call.axis), mine)))
    if total.count.size and total.count[0] < 2:
        raise internal.too_few_values(
            total.count[0], f"the global batch over {comm.Get_size()} ranks",
            f" (this rank's x has shape {call.x.shape}, channel axis {call.axis})")
    return internal.normalize_with(call, *internal.variances(total))


def backward(dy, x, stats, gamma=None, *, axis=1, training=True, out=None, device=None,
             comm=None, stream=None, activation=None, y=None, dresidual=None):
    """``fastbn.backward`` through the statistics of the global batch.

    Parameters
    ----------
    dy, x, stats, gamma, axis, training, out, device, stream, activation, y, dresidual
        As for ``fastbn.backward``: this rank's slices, and the stats that ``forward`` returned.
        ``training`` must be the same on every rank.
    comm : mpi4py communicator, optional
        The ranks of the forward call; ``MPI.COMM_WORLD`` by default. Collective.

    Returns
    -------
    dx : ndarray
        This rank's slice of the gradient of the global loss.
    dgamma, dbeta : ndarray, shape (C,)
        This rank's share of them: summed over the ranks they give the global batch's.
    """
    comm = _communicator(comm)
    try:
        training = internal.flag("training", training)
        if training:
            call = internal.check_backward(dy, x, stats, gamma, axis, True, out, device, stream,
                                           activation, y, dresidual)
    except Exception as error:
        _exchange(comm, None, error)
    if not training:  # constant statistics: nothing couples the ranks
        return internal.backward(dy, x, stats, gamma, axis=axis, training=False, out=out,
                                 device=device, stream=stream, activation=activation, y=y,
                                 dresidual=dresidual)

    def add(sum_dy, sum_dy_xmu, count):
        everyone = _exchange(comm, (_layout(call.x, call.axis), (sum_dy, sum_dy_xmu, count)))
        total_dy, total_dy_xmu = np.zeros_like(sum_dy), np.zeros_like(sum_dy_xmu)
        for part_dy, part_dy_xmu, _ in everyone:  # in rank order: the same bits everywhere
            total_dy += part_dy
            total_dy_xmu += part_dy_xmu
        return total_dy, total_dy_xmu, sum(n for _, _, n in everyone)

    return internal.run_backward(call, add)


class SyncBatchNorm(BatchNorm):
    """``fastbn.BatchNorm`` whose training statistics are those of the global batch over ``comm``.

    Same arguments, attributes and state dict as ``BatchNorm``, plus ``comm`` (an mpi4py
    communicator, ``MPI.COMM_WORLD`` by default). ``grads()`` holds this rank's share of dgamma
    and dbeta: all-reduce them (sum) with the other parameters' gradients. Every rank must call
    forward and backward together. ``SyncBatchNorm.convert(model)`` swaps a model's BatchNorm
    layers for synchronized ones.
    """

    def __init__(self, num_features, *, comm=None, **options):
        super().__init__(num_features, **options)
        self.comm = _communicator(comm)

    def _forward(self, x, gamma, beta, axis, training, running_mean, running_var, momentum, eps,
                 residual, activation):
        return forward(x, gamma, beta, axis=axis, training=training, running_mean=running_mean,
                       running_var=running_var, momentum=momentum, eps=eps, stream=self.stream,
                       comm=self.comm, residual=residual, activation=activation)

    def _backward(self, dy, x, stats, gamma, axis, training, activation, y, dresidual):
        return backward(dy, x, stats, gamma, axis=axis, training=training, stream=self.stream,
                        comm=self.comm, activation=activation, y=y, dresidual=dresidual)

    @classmethod
    def convert(cls, model, comm=None):
        """``model`` with each ``BatchNorm`` in it replaced by a ``SyncBatchNorm`` sharing its
        arrays and state.

        ``model`` may be a layer, or a list, tuple or dict of layers, or an object whose
        attributes hold them, nested to any depth; lists, dicts and attributes are changed in
        place. Returns the converted model (a new object only when ``model`` is a layer or a
        tuple).
        """
        comm = _communicator(comm)
        seen = {}

        def visit(obj):
            if id(obj) in seen:
                return seen[id(obj)]
            if isinstance(obj, BatchNorm) and not isinstance(obj, cls):
                new = cls.__new__(cls)
                new.__dict__.update(obj.__dict__)  # the same arrays: optimizers keep working
                new.comm = comm
                seen[id(obj)] = new
                return new
            seen[id(obj)] = obj
            if isinstance(obj, list):
                obj[:] = [visit(item) for item in obj]
            elif isinstance(obj, tuple):
                seen[id(obj)] = obj = type(obj)(*map(visit, obj)) if hasattr(obj, "_fields") \
                    else tuple(map(visit, obj))
            elif isinstance(obj, dict):
                for key in list(obj):
                    obj[key] = visit(obj[key])
            elif hasattr(obj, "__dict__") and not isinstance(obj, _NOT_MODELS):
                for key, value in list(vars(obj).items()):
                    setattr(obj, key, visit(value))
            return obj

        return visit(model)
