"""The first experiment of Ioffe & Szegedy (2015), in plain NumPy with fastbn.BatchNorm.

A fully connected network with three sigmoid hidden layers of 100 units, trained by mini-batch SGD
with and without batch norm (inserted before each sigmoid), at a base learning rate and at a
several-times higher one. The data are scikit-learn's handwritten digits (8×8 images, no download),
standing in for the paper's MNIST. Writes a PNG with (a) test accuracy against training step and
(b) the 15th, 50th and 85th percentiles of one hidden unit's input (the last hidden layer's first
unit, before its sigmoid) over training, without and with BN: the paper's Figure 1.

The BN layers are fastbn's, or with ``--bn numpy`` the same layer written in plain NumPy (the
textbook equations): the networks train alike, and the run prints the training steps per second
of each.

``--relu`` also trains the same networks with ReLUs in place of the sigmoids, without BN and with
fastbn's BN fused with its ReLU (``fastbn.BatchNorm(100, activation="relu")``: one pass forward,
and the ReLU's mask applied inside BN's backward), and adds them to the summary (not to the
plot).

    pip install -e ".[examples]"
    python examples/paper_experiment.py [--steps 4000] [--bn {fastbn,numpy,both}] [--relu]
                                        [--out examples/paper_experiment.png]
"""
import argparse
import time

import numpy as np

import fastbn

HIDDEN = (100, 100, 100)
BATCH = 60  # the paper's mini-batch size


def load_digits_split(seed=0, test_size=500):
    """``(x_train, y_train, x_test, y_test)``: the digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:test_size], order[test_size:]
    return x[train], digits.target[train], x[test], digits.target[test]


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class NumpyBatchNorm:
    """Batch norm over the batch axis of N×D inputs in plain NumPy (float32), with the parts of
    ``fastbn.BatchNorm``'s interface this network uses: the speed baseline of ``--bn numpy``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        self.gamma = np.ones(num_features, np.float32)
        self.beta = np.zeros(num_features, np.float32)
        self.running_mean = np.zeros(num_features, np.float32)
        self.running_var = np.ones(num_features, np.float32)
        self.eps, self.momentum, self.training = eps, momentum, True

    def train(self, mode=True):
        self.training = mode

    def __call__(self, x):
        if self.training:
            mean, var = x.mean(axis=0), x.var(axis=0)
            m = self.momentum
            self.running_mean = (1 - m) * self.running_mean + m * mean
            self.running_var = (1 - m) * self.running_var + m * var * len(x) / (len(x) - 1)
        else:
            mean, var = self.running_mean, self.running_var
        self.invstd = 1 / np.sqrt(var + self.eps)
        self.xhat = (x - mean) * self.invstd
        return self.gamma * self.xhat + self.beta

    def backward(self, dy):
        self.dbeta = dy.sum(axis=0)
        self.dgamma = (dy * self.xhat).sum(axis=0)
        return self.gamma * self.invstd * (dy - self.dbeta / len(dy) - self.xhat * self.dgamma / len(dy))

    def params(self):
        return {"gamma": self.gamma, "beta": self.beta}

    def grads(self):
        return {"gamma": self.dgamma, "beta": self.dbeta}


LAYERS = {"fastbn": fastbn.BatchNorm, "numpy": NumpyBatchNorm}


def fused_relu_layer(num_features):
    """fastbn's BN fused with the ReLU after it: ``relu(BN(z))`` in one layer."""
    return fastbn.BatchNorm(num_features, activation="relu")


class Network:
    """Linear layers with sigmoids between them; with ``batch_norm``, BN before each sigmoid
    (``layer``: a BN layer class of ``LAYERS``). With ``activation="relu"``, ReLUs instead of the
    sigmoids, and with ``batch_norm`` each BN and its ReLU one fused layer (``layer`` is not
    used).

    Weights start as small Gaussians, as in the paper. With BN, a hidden layer has no bias: BN's
    beta takes its place.
    """

    def __init__(self, sizes, batch_norm, rng, layer=fastbn.BatchNorm, activation="sigmoid"):
        self.batch_norm, self.activation = batch_norm, activation
        self.weights = [rng.normal(0.0, 0.1, (n_in, n_out)).astype(np.float32)
                        for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        self.biases = [np.zeros(n, np.float32) for n in sizes[1:]]
        if activation == "relu":
            layer = fused_relu_layer
        self.norms = [layer(n) for n in sizes[1:-1]] if batch_norm else []

    def train(self, mode=True):
        for bn in self.norms:
            bn.train(mode)

    def folded(self):
        """The network for inference: each BN folded into the Linear layer before it.

        ``fastbn.fold`` takes PyTorch's weight layout, output channels first, hence the
        transposes. The result is a plain network with the same eval-mode outputs.
        """
        plain = Network.__new__(Network)
        plain.batch_norm, plain.norms, plain.activation = False, [], self.activation
        plain.weights, plain.biases = [], []
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if k < len(self.norms):
                bn = self.norms[k]
                w_t, b = fastbn.fold(w.T, None, bn.gamma, bn.beta, bn.running_mean,
                                     bn.running_var, bn.eps)
                w = w_t.T
            plain.weights.append(np.ascontiguousarray(w))
            plain.biases.append(b)
        return plain

    def forward(self, x):
        """Class scores; keeps what backward needs, and each sigmoid's input in ``self.inputs``
        (with ReLUs: each ReLU's input, or with the fused BN+ReLU its output, as the fused layer
        keeps no input of its ReLU)."""
        self.activations, self.inputs = [x], []
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = self.activations[-1] @ w
            if k == len(self.weights) - 1:
                return z + b
            z = self.norms[k](z) if self.batch_norm else z + b
            self.inputs.append(z)
            if self.activation == "relu":
                # the fused layer's output is already relu(BN(z))
                self.activations.append(z if self.batch_norm else np.maximum(z, 0))
            else:
                self.activations.append(sigmoid(z))

    def backward(self, dscores):
        """Gradients of every parameter, as ``[(array, gradient), ...]``."""
        grads = []
        delta = dscores
        for k in reversed(range(len(self.weights))):
            a = self.activations[k]
            grads.append((self.weights[k], a.T @ delta))
            if k == len(self.weights) - 1 or not self.batch_norm:
                grads.append((self.biases[k], delta.sum(axis=0)))
            if k == 0:
                break
            delta = delta @ self.weights[k].T
            if self.activation == "relu":
                if not self.batch_norm:
                    delta = delta * (a > 0)  # through the ReLU (the fused layer does it itself)
            else:
                delta = delta * a * (1.0 - a)  # through the sigmoid
            if self.batch_norm:
                bn = self.norms[k - 1]
                delta = bn.backward(delta)
                grads += [(bn.params()[name], bn.grads()[name]) for name in ("gamma", "beta")]
        return grads


def cross_entropy_gradient(scores, labels):
    """Gradient of the mean softmax cross-entropy with respect to the scores."""
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return p / len(labels)


def accuracy(net, x, y):
    net.train(False)
    predicted = net.forward(x).argmax(axis=1)
    net.train(True)
    return float((predicted == y).mean())


def train(batch_norm, learning_rate, steps, data, seed=0, every=50, progress=None,
          layer=fastbn.BatchNorm, activation="sigmoid"):
    """Train one network; returns ``{"step", "accuracy", "percentiles"}`` recorded every
    ``every``, and ``"steps_per_second"``: training steps (forward, backward, update) per second
    of the time they took, evaluation left out. ``activation``: "sigmoid" (the paper's) or
    "relu" (with ``batch_norm``, fastbn's fused BN+ReLU layers).

    ``percentiles`` are the 15th, 50th and 85th percentiles of the last hidden layer's first
    unit's input over the test set, in eval mode (running statistics for BN).
    """
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    net = Network((x_train.shape[1], *HIDDEN, 10), batch_norm, rng, layer, activation)
    history = {"step": [], "accuracy": [], "percentiles": []}
    training_time = 0.0
    for step in range(steps + 1):
        if step % every == 0:
            history["step"].append(step)
            history["accuracy"].append(accuracy(net, x_test, y_test))
            net.train(False)
            net.forward(x_test)
            net.train(True)
            history["percentiles"].append(np.percentile(net.inputs[-1][:, 0], [15, 50, 85]))
            if progress:
                progress(step, history["accuracy"][-1])
        if step == steps:
            break
        batch = rng.integers(0, len(x_train), BATCH)
        start = time.perf_counter()
        scores = net.forward(x_train[batch])
        for param, grad in net.backward(cross_entropy_gradient(scores, y_train[batch])):
            param -= learning_rate * grad
        training_time += time.perf_counter() - start
    history["steps_per_second"] = steps / training_time if training_time else None
    history["percentiles"] = np.array(history["percentiles"])
    history["network"] = net
    return history


def steps_to_reach(history, target):
    """The first recorded step at which the test accuracy reached ``target``, or None."""
    return next((s for s, a in zip(history["step"], history["accuracy"]) if a >= target), None)


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (label, history), style in zip(runs.items(), ("C0--", "C0-", "C1--", "C1-")):
        axes[0].plot(history["step"], history["accuracy"], style, label=label)
    axes[0].set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy", ylim=(0, 1))
    axes[0].legend(loc="lower right")
    for ax, key, title in ((axes[1], "without BN", "(b) without BN"),
                           (axes[2], "with BN", "(c) with BN")):
        history = runs[next(k for k in runs if k.startswith(key))]
        for q, percentile in zip(history["percentiles"].T, (15, 50, 85)):
            ax.plot(history["step"], q, label=f"{percentile}th percentile")
        ax.set(title=f"{title}: input to a sigmoid, last hidden layer", xlabel="training step")
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--boost", type=float, default=5.0, help="the higher learning rate's factor")
    parser.add_argument("--bn", choices=[*LAYERS, "both"], default="both",
                        help="the BN layers: fastbn's, plain NumPy's, or both in turn (default)")
    parser.add_argument("--relu", action="store_true",
                        help="also train the networks with ReLUs instead of sigmoids: without "
                             "BN, and with fastbn's BN fused with the ReLU")
    parser.add_argument("--out", default="examples/paper_experiment.png")
    args = parser.parse_args()
    data = load_digits_split()
    rates = (args.learning_rate, args.learning_rate * args.boost)
    layers = list(LAYERS) if args.bn == "both" else [args.bn]
    networks = [(False, None, "sigmoid")] + [(True, name, "sigmoid") for name in layers]
    if args.relu:
        networks += [(False, None, "relu"), (True, "fastbn", "relu")]
    runs = {}
    for batch_norm, layer, activation in networks:
        for rate in rates:
            label = (f"with BN ({layer}), learning rate {rate:g}" if batch_norm
                     else f"without BN, learning rate {rate:g}")
            if activation == "relu":
                label = ("ReLU, " + label).replace("BN (fastbn)", "BN+ReLU fused (fastbn)")
            start = time.perf_counter()

            def progress(step, acc, label=label):
                print(f"\r{label}: step {step:5d}/{args.steps}, test accuracy {acc:.3f}",
                      end="", flush=True)
            runs[label] = train(batch_norm, rate, args.steps, data, progress=progress,
                                layer=LAYERS.get(layer), activation=activation)
            print(f"  ({time.perf_counter() - start:.0f} s)")
    plot({label: history for label, history in runs.items() if not label.startswith("ReLU")
          and ("BN (" not in label or f"BN ({layers[0]})" in label)}, args.out)
    print(f"\nwrote {args.out}\n")
    # Inference: fold each BN into the Linear layer before it; the outputs stay the same.
    net = runs[f"with BN ({layers[0]}), learning rate {rates[0]:g}"]["network"]
    net.train(False)
    x_test = data[2]
    difference = np.abs(net.folded().forward(x_test) - net.forward(x_test)).max()
    print(f"BN folded into the weights for inference: largest change of a score {difference:.1e}\n")
    width = max(46, *map(len, runs))
    print(f"{'network':{width}s} {'final accuracy':>14s} {'steps to 90%':>13s} {'steps/s':>8s}")
    for label, history in runs.items():
        reached = steps_to_reach(history, 0.9)
        print(f"{label:{width}s} {history['accuracy'][-1]:14.3f} "
              f"{reached if reached is not None else 'never':>13} "
              f"{history['steps_per_second']:8.0f}")


if __name__ == "__main__":
    main()
