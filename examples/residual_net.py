"""A small residual network in plain NumPy, its batch norms fused with the residual add and ReLU.

The network, on scikit-learn's handwritten digits (8×8 images, as in paper_experiment.py):

    stem:    h = relu(BN(x W0))
    blocks:  h = relu(BN(h W) + h)       (two of them, 64 units wide)
    head:    scores = h W_out + b

trained by mini-batch SGD twice, from the same initial weights on the same batches:

- **fused**: each BN+add+ReLU is one ``fastbn.BatchNorm(width, activation="relu")``:
  ``h = bn(z, residual=h)`` computes ``relu(BN(z) + h)`` in one pass, and ``bn.backward(dh)``
  returns ``(dz, dresidual)``, the ReLU's mask applied in the same pass;
- **unfused**: fastbn's plain ``BatchNorm``, then NumPy's add and maximum; backward masks dh by
  hand (``dh * (h > 0)``), which is also the residual's gradient.

Both compute the same function, so their losses agree step for step (to float32 rounding); the
run prints each one's test accuracy and training steps per second.

    pip install -e ".[examples]"
    python examples/residual_net.py [--steps 2000] [--width 64] [--blocks 2]
"""
import argparse
import os
import sys
import time

import numpy as np

import fastbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paper_experiment import load_digits_split

BATCH = 64


class UnfusedBatchNormAddReLU:
    """``relu(BN(x) + residual)`` in three steps: fastbn's plain batch norm, then the add and the
    ReLU in NumPy; backward masks ``dy`` by hand. The fused layer's interface: ``layer(x,
    residual=None)``, and ``layer.backward(dy)`` returns dx, or ``(dx, dresidual)`` after a
    forward with a residual."""

    def __init__(self, num_features):
        self.bn = fastbn.BatchNorm(num_features)

    def train(self, mode=True):
        self.bn.train(mode)
        return self

    def __call__(self, x, residual=None):
        y = self.bn(x)  # a new array: ours to change in place
        if residual is not None:
            np.add(y, residual, out=y)
        np.maximum(y, 0, out=y)
        self.y, self.had_residual = y, residual is not None
        return y

    def backward(self, dy):
        masked = dy * (self.y > 0)  # the ReLU's backward; the add's passes it on as it is
        dx = self.bn.backward(masked)
        return (dx, masked) if self.had_residual else dx

    def params(self):
        return self.bn.params()

    def grads(self):
        return self.bn.grads()


def fused_layer(num_features):
    return fastbn.BatchNorm(num_features, activation="relu")


LAYERS = {"fused": fused_layer, "unfused": UnfusedBatchNormAddReLU}


class ResidualNet:
    """The stem, ``blocks`` residual blocks of ``width`` units and the head; ``layer`` makes each
    BN+add+ReLU (a value of LAYERS). The Linear layers before BN have no bias: BN's beta takes its
    place."""

    def __init__(self, n_in, width, n_out, blocks, rng, layer):
        shapes = [(n_in, width)] + [(width, width)] * blocks
        # He initialization, for the ReLUs
        self.weights = [(rng.standard_normal(shape) * np.sqrt(2 / shape[0])).astype(np.float32)
                        for shape in shapes]
        self.w_out = (rng.standard_normal((width, n_out)) * np.sqrt(1 / width)).astype(np.float32)
        self.b_out = np.zeros(n_out, np.float32)
        self.norms = [layer(width) for _ in shapes]

    def train(self, mode=True):
        for bn in self.norms:
            bn.train(mode)

    def forward(self, x):
        """Class scores; keeps the input of each Linear layer for backward."""
        self.inputs = [x]
        h = self.norms[0](x @ self.weights[0])
        for w, bn in zip(self.weights[1:], self.norms[1:]):
            self.inputs.append(h)
            h = bn(h @ w, residual=h)
        self.inputs.append(h)
        return h @ self.w_out + self.b_out

    def backward(self, dscores):
        """Gradients of every parameter, as ``[(array, gradient), ...]``."""
        grads = [(self.w_out, self.inputs[-1].T @ dscores), (self.b_out, dscores.sum(axis=0))]
        dh = dscores @ self.w_out.T
        for k in reversed(range(len(self.weights))):
            bn = self.norms[k]
            if k == 0:
                dz = bn.backward(dh)
            else:
                dz, dresidual = bn.backward(dh)
            grads.append((self.weights[k], self.inputs[k].T @ dz))
            grads += [(bn.params()[name], bn.grads()[name]) for name in ("gamma", "beta")]
            if k > 0:
                dh = dz @ self.weights[k].T + dresidual  # through W, and around it
        return grads


def cross_entropy(scores, labels):
    """The mean softmax cross-entropy, and its gradient with respect to the scores."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    total = p.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, labels]))
    p /= total
    p[rows, labels] -= 1.0
    return loss, p / len(labels)


def accuracy(net, x, y):
    net.train(False)
    predicted = net.forward(x).argmax(axis=1)
    net.train(True)
    return float((predicted == y).mean())


def train(layer, data, steps, width=64, blocks=2, learning_rate=0.1, seed=0):
    """Train one network with BN+add+ReLU layers ``layer`` (a key of LAYERS); returns ``{"losses":
    the training loss of each step, "accuracy": the final test accuracy, "steps_per_second":
    training steps (forward, backward, update) per second of the time they took, "network"}``.
    The same ``seed`` gives the same initial weights and batches whatever the layer."""
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    net = ResidualNet(x_train.shape[1], width, 10, blocks, rng, LAYERS[layer])
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        batch = rng.integers(0, len(x_train), BATCH)
        loss, dscores = cross_entropy(net.forward(x_train[batch]), y_train[batch])
        for param, grad in net.backward(dscores):
            param -= learning_rate * grad
        losses.append(loss)
    elapsed = time.perf_counter() - start
    return {"losses": np.array(losses), "accuracy": accuracy(net, x_test, y_test),
            "steps_per_second": steps / elapsed if elapsed else None, "network": net}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_digits_split()
    options = {"width": args.width, "blocks": args.blocks,
               "learning_rate": args.learning_rate, "seed": args.seed}
    for layer in LAYERS:  # the warm-up: compiles fastbn's kernels, or loads them from the cache
        train(layer, data, 2, **options)
    runs = {layer: train(layer, data, args.steps, **options) for layer in LAYERS}
    print(f"{args.blocks} residual blocks of {args.width} units, {args.steps} SGD steps of "
          f"{BATCH} digits, learning rate {args.learning_rate:g}")
    print(f"{'BN+add+ReLU':10s} {'first loss':>10s} {'final loss':>10s} {'test accuracy':>13s} "
          f"{'steps/s':>8s}")
    for layer, run in runs.items():
        last = run["losses"][-50:].mean()  # the mean over the last 50 steps: less noisy
        print(f"{layer:10s} {run['losses'][0]:10.4f} {last:10.4f} {run['accuracy']:13.3f} "
              f"{run['steps_per_second']:8.0f}")
    first = min(50, args.steps)
    difference = np.abs(runs["fused"]["losses"][:first] - runs["unfused"]["losses"][:first])
    speedup = runs["fused"]["steps_per_second"] / runs["unfused"]["steps_per_second"]
    print(f"largest difference of the training loss, fused against unfused, over the first "
          f"{first} steps: {difference.max():.1e}; fused takes {speedup:.2f} times the steps per "
          f"second of unfused")


if __name__ == "__main__":
    main()
