"""PyTorch's CPU batch norm on the same NumPy arrays, the comparison of the benchmarks.

Imported only by ``bench/`` and ``python -m fastbn``, and only where torch is installed: it is not
a dependency of fastbn.
"""
import numba
import torch


class TorchBatchNorm:
    """PyTorch's three batch-norm ops on zero-copy views of ``x``, ``dy``, ``gamma``, ``beta``.

    The channel axis is moved to 1 as a view, so a channels-last array stays channels-last in
    memory and PyTorch runs its channels-last kernels on it. The ops are the ATen ones autograd
    calls, without autograd's bookkeeping; PyTorch uses as many threads as Numba.
    """

    def __init__(self, x, dy, gamma, beta, axis, eps=1e-5):
        torch.set_num_threads(numba.get_num_threads())
        self.x = torch.from_numpy(x).movedim(axis, 1)
        self.dy = torch.from_numpy(dy).movedim(axis, 1)
        self.gamma = torch.from_numpy(gamma)
        self.beta = torch.from_numpy(beta)
        self.running_mean = torch.zeros(gamma.shape, dtype=self.x.dtype)
        self.running_var = torch.ones(gamma.shape, dtype=self.x.dtype)
        self.eps = eps
        _, self.mean, self.invstd = self.train_forward_with_stats()

    def train_forward_with_stats(self):
        return torch.ops.aten.native_batch_norm(self.x, self.gamma, self.beta, self.running_mean,
                                                self.running_var, True, 0.1, self.eps)

    def train_forward(self):
        """y (as a tensor laid out like x's view) of training forward."""
        return self.train_forward_with_stats()[0]

    def eval_forward(self):
        return torch.ops.aten.native_batch_norm(self.x, self.gamma, self.beta, self.running_mean,
                                                self.running_var, False, 0.1, self.eps)[0]

    def train_backward(self):
        """(dx, dgamma, dbeta) of training backward."""
        return torch.ops.aten.native_batch_norm_backward(
            self.dy, self.x, self.gamma, self.running_mean, self.running_var, self.mean,
            self.invstd, True, self.eps, [True, True, True])
