"""fastbn: fast, exact batch normalization for NumPy, with Numba kernels.

>>> import numpy as np, fastbn
>>> x = np.random.default_rng(0).normal(size=(32, 8, 16, 16)).astype(np.float32)
>>> y, stats = fastbn.forward(x)                        # training mode, channel axis 1
>>> dx, dgamma, dbeta = fastbn.backward(np.ones_like(y), x, stats)
"""
from ._batchnorm import BatchStats, backward, forward
from ._checks import cuda_available
from ._fold import fold, inference_affine
from ._moments import Moments, merge_moments, moments, normalize
from ._norms import (
    NormStats,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from ._outputs import release as release_output_cache
from .layers import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchStats", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "Moments",
           "NormStats", "RMSNorm", "backward", "cuda_available", "fold", "forward", "group_norm",
           "group_norm_backward", "inference_affine", "instance_norm", "instance_norm_backward",
           "layer_norm", "layer_norm_backward", "merge_moments", "moments", "normalize",
           "release_output_cache", "rms_norm", "rms_norm_backward"]


def __getattr__(name):
    # fastbn.distributed imports mpi4py, which starts MPI: only when it is asked for.
    if name == "distributed":
        import importlib
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
__version__ = "0.1.0"
