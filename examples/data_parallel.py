"""Data-parallel training over MPI with synchronized batch norm, in plain NumPy.

The network of paper_experiment.py (three sigmoid layers of 100 units, BN before each sigmoid) is
trained by SGD on the digits, each mini-batch of 60 split across the ranks. Each rank:

1. takes its slice of the global mini-batch (every rank draws the same indices);
2. runs forward and backward, its BN layers converted to ``fastbn.distributed.SyncBatchNorm``
   so that they normalize with the statistics of the whole mini-batch;
3. sums every parameter's gradient over the ranks (one ``Allreduce`` each; the BN layers' dgamma
   and dbeta are this rank's shares, summed like the rest) and takes the same SGD step.

So every rank holds the same model, the one a single process would train on the whole batches.
``--check`` trains that single-process model too, on rank 0, and prints how far apart they are.

    pip install -e ".[mpi,examples]"
    mpiexec -n 2 python -m mpi4py examples/data_parallel.py [--steps 1000] [--check]
"""
import argparse
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastbn.distributed import SyncBatchNorm  # noqa: E402
from paper_experiment import (BATCH, HIDDEN, Network, accuracy, cross_entropy_gradient,  # noqa: E402
                              load_digits_split)


def train(net, data, steps, learning_rate, comm=None, seed=0):
    """SGD on ``net``: with ``comm``, this rank's slice of each global batch and summed gradients;
    without, the whole batches in one process."""
    x_train, y_train = data[0], data[1]
    draw = np.random.default_rng(seed)  # the same draws on every rank
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    mine = np.array_split(np.arange(BATCH), size)[rank]  # uneven when size does not divide 60
    for _ in range(steps):
        batch = draw.integers(0, len(x_train), BATCH)[mine]
        scores = net.forward(x_train[batch])
        # the gradient of the mean loss over the global batch: this rank's terms of it
        dscores = cross_entropy_gradient(scores, y_train[batch]) * (len(batch) / BATCH)
        for param, grad in net.backward(dscores):
            if comm is not None:
                comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)
            param -= learning_rate * grad
    return net


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--check", action="store_true",
                        help="also train on one process (rank 0) and compare the parameters")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    data = load_digits_split()
    sizes = (data[0].shape[1], *HIDDEN, 10)
    net = SyncBatchNorm.convert(Network(sizes, True, np.random.default_rng(1)), comm)
    train(net, data, args.steps, args.learning_rate, comm)
    if comm.Get_rank() != 0:
        return
    print(f"{comm.Get_size()} ranks, {args.steps} steps of {BATCH} digits: test accuracy "
          f"{accuracy(net, data[2], data[3]):.3f}")
    if args.check:
        single = train(Network(sizes, True, np.random.default_rng(1)), data, args.steps,
                       args.learning_rate)
        params = lambda n: n.weights + n.biases + [p for bn in n.norms  # noqa: E731
                                                   for p in (bn.gamma, bn.beta, bn.running_mean,
                                                             bn.running_var)]
        gap = max(float(np.abs(a - b).max()) for a, b in zip(params(net), params(single)))
        print(f"one process on the whole batches: test accuracy "
              f"{accuracy(single, data[2], data[3]):.3f}; largest parameter difference {gap:.2e}")


if __name__ == "__main__":
    main()
