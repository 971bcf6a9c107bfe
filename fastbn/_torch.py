"""PyTorch's batch norm on the same arrays (NumPy, or CUDA ones), the comparison of the benchmarks.

Imported only by ``bench/`` and ``python -m fastbn``, and only where torch is installed: it is not
a dependency of fastbn.
"""
import numba
import numpy as np
import torch


def _tensor(a):
    """A tensor sharing ``a``'s memory: a NumPy array on the CPU, a CUDA array on its GPU."""
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.as_tensor(a, device="cuda")


class TorchBatchNorm:
    """PyTorch's three batch-norm ops on zero-copy views of ``x``, ``dy``, ``gamma``, ``beta``.

    The channel axis is moved to 1 as a view, so a channels-last array stays channels-last in
    memory and PyTorch runs its channels-last kernels on it. The ops are the ATen ones autograd
    calls, without autograd's bookkeeping; PyTorch uses as many threads as Numba.
    """

    def __init__(self, x, dy, gamma, beta, axis, running_mean=None, running_var=None,
                 momentum=0.1, eps=1e-5):
        torch.set_num_threads(numba.get_num_threads())
        self.axis = axis
        self.x = _tensor(x).movedim(axis, 1)
        self.dy = _tensor(dy).movedim(axis, 1)
        self.gamma = _tensor(gamma)
        self.beta = _tensor(beta)
        channels = gamma.shape[0]
        self.running_mean = torch.zeros(channels, dtype=self.x.dtype, device=self.x.device) \
            if running_mean is None else _tensor(running_mean).clone()
        self.running_var = torch.ones(channels, dtype=self.x.dtype, device=self.x.device) \
            if running_var is None else _tensor(running_var).clone()
        self.momentum, self.eps = momentum, eps
        _, self.mean, self.invstd = torch.ops.aten.native_batch_norm(
            self.x, self.gamma, self.beta, None, None, True, momentum, eps)  # leaves running stats

    def _forward(self, training):
        return torch.ops.aten.native_batch_norm(self.x, self.gamma, self.beta, self.running_mean,
                                                self.running_var, training, self.momentum,
                                                self.eps)

    def train_forward(self):
        """y of training forward (which updates the running statistics, as PyTorch's does)."""
        return self._forward(True)[0]

    def eval_forward(self):
        """y of eval forward, with the running statistics."""
        return self._forward(False)[0]

    def train_backward(self):
        """(dx, dgamma, dbeta) of training backward."""
        return torch.ops.aten.native_batch_norm_backward(
            self.dy, self.x, self.gamma, self.running_mean, self.running_var, self.mean,
            self.invstd, True, self.eps, [True, True, True])

    def numpy(self, t):
        """A result as a NumPy array in x's layout (a view)."""
        return (t.movedim(1, self.axis) if t.ndim == self.x.ndim else t).cpu().numpy()
