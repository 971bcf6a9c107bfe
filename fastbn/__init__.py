"""fastbn: fast, exact batch normalization for NumPy, with Numba kernels.

>>> import numpy as np, fastbn
>>> x = np.random.default_rng(0).normal(size=(32, 8, 16, 16)).astype(np.float32)
>>> y, stats = fastbn.forward(x)                        # training mode, channel axis 1
>>> dx, dgamma, dbeta = fastbn.backward(np.ones_like(y), x, stats)
"""
from ._api import BatchStats, backward, cuda_available, fold, forward, inference_affine
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchStats", "backward",
           "cuda_available", "fold", "forward", "inference_affine"]
__version__ = "0.1.0"
