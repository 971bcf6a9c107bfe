"""Four small NumPy training loops, each run with fastbn's layers and with plain NumPy ones.

What matters to a NumPy trainer is the step of their own loop, not one op's microseconds: the
normalization layers share the machine with NumPy's matrix products (and OpenBLAS's threads).
Each loop trains on scikit-learn's handwritten digits with mini-batch SGD, evaluates on the test
set every ``EVAL_EVERY`` steps (as a trainer watching its progress does), and is timed over its
training steps:

- ``mlp``: 64→128→BN→ReLU→128→BN→ReLU→10, batch 64 (BatchNorm1d);
- ``conv``: two 3×3 convolutions as im2col matrix products on channels-last images, each
  followed by BatchNorm2d (channel axis -1), ReLU and 2×2 max pooling (8×8×1 → 8×8×16 → 4×4×16
  → 4×4×32 → 2×2×32), then a Linear, batch 64;
- ``layernorm``: the digits as 16 tokens of 4 pixels, embedded in 64 dimensions, then a pre-norm
  residual MLP block ``h + W2·relu(W1·LN(h))`` (64→256→64, a transformer's block without
  attention), mean over tokens, a Linear; batch 32, so the layer norm sees 32×16×64;
- ``residual``: a stem 64→128→BN→ReLU and two blocks ``relu(BN(h·W) + h)``, batch 64: fastbn's
  BatchNorm with ``activation="relu"`` (BN, add and ReLU in one pass) against NumPy's BN, add and
  ReLU.

``--norm numpy`` uses the textbook NumPy layers below (batch norm in five lines, and its backward),
``--norm fastbn`` fastbn's, ``both`` (the default) runs the two in turn, from the same weights on
the same batches, for ``--rounds`` rounds each, and prints training steps per second (the best
round), the normalization layers' share of the step (their calls timed inside the loop) and the
largest difference of the two runs' losses.

    pip install -e ".[examples]"
    python examples/training_loops.py [--loop mlp conv layernorm residual] [--steps 440]
"""
import argparse
import os
import sys
import time

import numpy as np

import fastbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from layer_norm_sequence import NumpyLayerNorm  # noqa: E402
from paper_experiment import load_digits_split  # noqa: E402

EVAL_EVERY = 22  # training steps between two evaluations on the test set
TEST_SIZE = 360  # digits held out: the eval batch is 360 samples
LEARNING_RATE = 0.05


# -- the NumPy normalization layers: the baseline ------------------------------------------------


class NumpyBatchNorm:
    """Batch norm in plain NumPy, statistics over every axis but ``axis`` (the channel axis),
    with the parts of ``fastbn.BatchNorm``'s interface the loops use."""

    def __init__(self, num_features, *, axis=1, eps=1e-5, momentum=0.1, dtype=np.float32):
        self.gamma, self.beta = np.ones(num_features, dtype), np.zeros(num_features, dtype)
        self.running_mean = np.zeros(num_features, dtype)
        self.running_var = np.ones(num_features, dtype)
        self.axis, self.eps, self.momentum, self.training = axis, eps, momentum, True

    def train(self, mode=True):
        self.training = mode
        return self

    def _shape(self, x):
        """Reduced axes, and the shape that broadcasts a per-channel vector against x."""
        axis = self.axis % x.ndim
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        return tuple(a for a in range(x.ndim) if a != axis), tuple(shape)

    def __call__(self, x):
        self.axes, shape = self._shape(x)
        if self.training:
            mean, var = x.mean(axis=self.axes), x.var(axis=self.axes)
            count = x.size // len(mean)
            self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean
            self.running_var = ((1 - self.momentum) * self.running_var
                                + self.momentum * var * count / (count - 1))
        else:
            mean, var = self.running_mean, self.running_var
        self.gamma_b = self.gamma.reshape(shape)
        self.invstd = (1 / np.sqrt(var + self.eps)).reshape(shape)
        self.xhat = (x - mean.reshape(shape)) * self.invstd
        return self.gamma_b * self.xhat + self.beta.reshape(shape)

    def backward(self, dy):
        self.dbeta = dy.sum(axis=self.axes)
        self.dgamma = (dy * self.xhat).sum(axis=self.axes)
        m = dy.size // len(self.dbeta)
        shape = self.invstd.shape
        return self.gamma_b * self.invstd * (dy - self.dbeta.reshape(shape) / m
                                             - self.xhat * self.dgamma.reshape(shape) / m)

    def params(self):
        return {"gamma": self.gamma, "beta": self.beta}

    def grads(self):
        return {"gamma": self.dgamma, "beta": self.dbeta}


class NumpyBatchNormAddReLU(NumpyBatchNorm):
    """``relu(BN(x) + residual)`` in NumPy, with the fused layer's interface: ``layer(x,
    residual=None)``; ``backward(dy)`` returns dx, or ``(dx, dresidual)`` after a residual."""

    def __call__(self, x, residual=None):
        y = super().__call__(x)
        if residual is not None:
            y += residual
        self.y, self.had_residual = np.maximum(y, 0), residual is not None
        return self.y

    def backward(self, dy):
        masked = dy * (self.y > 0)
        dx = super().backward(masked)
        return (dx, masked) if self.had_residual else dx


def fastbn_layers():
    return dict(batch=fastbn.BatchNorm, layer=fastbn.LayerNorm,
                fused=lambda n: fastbn.BatchNorm(n, activation="relu"))


def numpy_layers():
    return dict(batch=NumpyBatchNorm, layer=NumpyLayerNorm, fused=NumpyBatchNormAddReLU)


NORMS = {"fastbn": fastbn_layers, "numpy": numpy_layers}


class Timed:
    """A normalization layer whose calls add their time to ``clock[0]``."""

    def __init__(self, layer, clock):
        self.layer, self.clock = layer, clock

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        y = self.layer(*args, **kwargs)
        self.clock[0] += time.perf_counter() - start
        return y

    def backward(self, dy):
        start = time.perf_counter()
        dx = self.layer.backward(dy)
        self.clock[0] += time.perf_counter() - start
        return dx

    def train(self, mode=True):
        self.layer.train(mode)
        return self

    def parameters(self):
        params, grads = self.layer.params(), self.layer.grads()
        return [(params[name], grads[name]) for name in params]


# -- the other layers, the same in both runs ----------------------------------------------------


class Linear:
    """``x @ W + b`` over the last axis (tokens and pixels share W)."""

    def __init__(self, n_in, n_out, rng, bias=True):
        self.w = (rng.standard_normal((n_in, n_out)) * np.sqrt(2 / n_in)).astype(np.float32)
        self.b = np.zeros(n_out, np.float32) if bias else None

    def __call__(self, x):
        self.x = x.reshape(-1, x.shape[-1])
        y = self.x @ self.w
        if self.b is not None:
            y += self.b
        return y.reshape(x.shape[:-1] + (y.shape[-1],))

    def backward(self, dy):
        dy2 = dy.reshape(-1, dy.shape[-1])
        self.dw = self.x.T @ dy2
        self.db = dy2.sum(axis=0) if self.b is not None else None
        return (dy2 @ self.w.T).reshape(dy.shape[:-1] + (self.w.shape[0],))

    def parameters(self):
        return [(self.w, self.dw)] + ([(self.b, self.db)] if self.b is not None else [])


class ReLU:
    def __call__(self, x):
        self.positive = x > 0
        return np.maximum(x, 0)

    def backward(self, dy):
        return dy * self.positive


class Conv3x3:
    """A 3×3 convolution with padding 1 on channels-last N×H×W×C images, as one matrix product
    of the im2col matrix (N·H·W × 9·C) with the weights (9·C × F): the layout in which im2col
    needs no transpose, so batch norm after it takes the channel axis -1."""

    def __init__(self, n_in, n_out, rng):
        self.w = (rng.standard_normal((9 * n_in, n_out)) * np.sqrt(2 / (9 * n_in))).astype(
            np.float32)

    def __call__(self, x):
        n, h, w, c = self.shape = x.shape
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        self.cols = np.concatenate([padded[:, i:i + h, j:j + w] for i in range(3)
                                    for j in range(3)], axis=-1).reshape(n * h * w, 9 * c)
        return (self.cols @ self.w).reshape(n, h, w, -1)

    def backward(self, dy):
        n, h, w, c = self.shape
        dy = dy.reshape(n * h * w, -1)
        self.dw = self.cols.T @ dy
        dcols = (dy @ self.w.T).reshape(n, h, w, 9, c)
        dpadded = np.zeros((n, h + 2, w + 2, c), np.float32)
        for k in range(9):
            dpadded[:, k // 3:k // 3 + h, k % 3:k % 3 + w] += dcols[:, :, :, k]
        return dpadded[:, 1:-1, 1:-1]

    def parameters(self):
        return [(self.w, self.dw)]


class MaxPool2:
    """2×2 max pooling, stride 2, of N×H×W×C; the gradient goes to every maximum of a window."""

    def __call__(self, x):
        n, h, w, c = x.shape
        windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
        y = windows.max(axis=(2, 4))
        self.mask = windows == y[:, :, None, :, None]
        return y

    def backward(self, dy):
        dx = self.mask * dy[:, :, None, :, None]
        n, h, _, w, _, c = dx.shape
        return dx.reshape(n, 2 * h, 2 * w, c)


def parameters_of(*layers):
    """``[(array, gradient), ...]`` of the layers that have parameters."""
    return [pair for layer in layers for pair in getattr(layer, "parameters", list)()]


class Sequential:
    def __init__(self, *layers):
        self.layers = layers

    def parameters(self):
        return parameters_of(*self.layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy


class Flatten:
    def __call__(self, x):
        self.shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, dy):
        return dy.reshape(self.shape)


class PreNormBlock:
    """``h + W2·relu(W1·LN(h) + b1) + b2``."""

    def __init__(self, width, hidden, norm, rng):
        self.mlp = Sequential(norm, Linear(width, hidden, rng), ReLU(), Linear(hidden, width, rng))

    def __call__(self, h):
        return h + self.mlp(h)

    def backward(self, dy):
        return dy + self.mlp.backward(dy)

    def parameters(self):
        return self.mlp.parameters()


class MeanTokens:
    def __call__(self, x):
        self.shape = x.shape
        return x.mean(axis=1)

    def backward(self, dy):
        return np.broadcast_to(dy[:, None, :] / self.shape[1], self.shape)


class Tokens:
    """The 8×8 digits as 16 tokens of 4 pixels (2×2 patches), embedded, plus a position's
    embedding."""

    def __init__(self, width, rng):
        self.embed = Linear(4, width, rng)
        self.position = (rng.standard_normal((16, width)) * 0.1).astype(np.float32)

    def __call__(self, x):
        patches = x.reshape(-1, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        return self.embed(patches) + self.position

    def backward(self, dy):
        self.dposition = dy.sum(axis=0)
        self.embed.backward(dy)
        return None

    def parameters(self):
        return self.embed.parameters() + [(self.position, self.dposition)]


class ResidualBlock:
    """``relu(BN(h·W) + h)``: ``fused`` is a layer called as ``fused(z, residual=h)``."""

    def __init__(self, width, fused, rng):
        self.linear, self.fused = Linear(width, width, rng, bias=False), fused

    def __call__(self, h):
        return self.fused(self.linear(h), residual=h)

    def backward(self, dy):
        dz, dresidual = self.fused.backward(dy)
        return self.linear.backward(dz) + dresidual

    def parameters(self):
        return parameters_of(self.linear, self.fused)


# -- the four networks ---------------------------------------------------------------------------


def mlp(layers, norm, rng):
    return Sequential(Linear(64, 128, rng, bias=False), norm(layers["batch"](128)), ReLU(),
                      Linear(128, 128, rng, bias=False), norm(layers["batch"](128)), ReLU(),
                      Linear(128, 10, rng)), 64


def conv(layers, norm, rng):
    return Sequential(Conv3x3(1, 16, rng), norm(layers["batch"](16, axis=-1)), ReLU(), MaxPool2(),
                      Conv3x3(16, 32, rng), norm(layers["batch"](32, axis=-1)), ReLU(), MaxPool2(),
                      Flatten(), Linear(128, 10, rng)), 64


def layernorm(layers, norm, rng):
    return Sequential(Tokens(64, rng), PreNormBlock(64, 256, norm(layers["layer"](64)), rng),
                      MeanTokens(), Linear(64, 10, rng)), 32


def residual(layers, norm, rng):
    return Sequential(Linear(64, 128, rng, bias=False), norm(layers["fused"](128)),
                      ResidualBlock(128, norm(layers["fused"](128)), rng),
                      ResidualBlock(128, norm(layers["fused"](128)), rng),
                      Linear(128, 10, rng)), 64


LOOPS = {"mlp": mlp, "conv": conv, "layernorm": layernorm, "residual": residual}
IMAGES = {"conv"}  # loops that take the digits as 1×8×8 images


def cross_entropy(scores, labels):
    """Mean softmax cross-entropy, and its gradient with respect to the scores."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(labels)), labels] + 1e-12).mean()
    p[np.arange(len(labels)), labels] -= 1
    return float(loss), p / len(labels)


class Run:
    """One loop with one kind of normalization layer, from a seed: ``steps(n)`` trains n steps
    (evaluating every EVAL_EVERY) and returns the seconds the training steps took."""

    def __init__(self, loop, norm, data, seed=0):
        self.clock, self.norms = [0.0], []

        def timed(layer):
            self.norms.append(Timed(layer, self.clock))
            return self.norms[-1]

        self.model, self.batch = LOOPS[loop](NORMS[norm](), timed, np.random.default_rng(seed))
        x_train, self.y_train, x_test, self.y_test = data
        if loop in IMAGES:
            x_train, x_test = x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1)
        self.x_train, self.x_test = x_train, x_test
        self.step, self.losses, self.accuracies = 0, [], []

    def train_step(self):
        start = (self.step * self.batch) % (len(self.x_train) - self.batch + 1)
        x = self.x_train[start:start + self.batch]
        labels = self.y_train[start:start + self.batch]
        loss, dscores = cross_entropy(self.model(x), labels)
        self.model.backward(dscores)
        for p, g in self.model.parameters():
            p -= LEARNING_RATE * g
        self.losses.append(loss)
        self.step += 1

    def evaluate(self):
        for layer in self.norms:
            layer.train(False)
        scores = self.model(self.x_test)
        for layer in self.norms:
            layer.train(True)
        self.accuracies.append(float((scores.argmax(axis=1) == self.y_test).mean()))

    def steps(self, n):
        """Train n steps, evaluating every EVAL_EVERY of them; return the training steps' seconds
        and the normalization layers' seconds within them."""
        elapsed, norm_before = 0.0, self.clock[0]
        for _ in range(n):
            start = time.perf_counter()
            self.train_step()
            elapsed += time.perf_counter() - start
            if self.step % EVAL_EVERY == 0:
                norm_at_eval = self.clock[0]
                self.evaluate()
                self.clock[0] = norm_at_eval  # the eval's calls are not the step's
        return elapsed, self.clock[0] - norm_before


def compare(loop, steps, rounds, data, norms=("fastbn", "numpy")):
    """Run ``loop`` with each norm, alternating rounds of ``steps`` training steps; returns
    ``{norm: {"steps_per_s", "norm_us_per_step", "share", "accuracy", "losses"}}``, the timings
    from each norm's fastest round."""
    runs = {norm: Run(loop, norm, data) for norm in norms}
    for run in runs.values():  # compiles fastbn's kernels (or loads them): not timed
        run.steps(2)
    best = {norm: None for norm in norms}
    for _ in range(rounds):
        for norm, run in runs.items():
            seconds, norm_seconds = run.steps(steps)
            if best[norm] is None or seconds < best[norm][0]:
                best[norm] = seconds, norm_seconds
    for run in runs.values():
        run.evaluate()  # the final accuracy
    return {norm: dict(steps_per_s=steps / seconds, norm_us_per_step=norm_seconds / steps * 1e6,
                       share=norm_seconds / seconds, accuracy=runs[norm].accuracies[-1],
                       losses=runs[norm].losses)
            for norm, (seconds, norm_seconds) in best.items()}


AGREEMENT_STEPS = 50  # the two runs' losses are compared over their first steps (later, rounding
#                       differences grow as training goes on, as between any two implementations)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", nargs="+", choices=list(LOOPS), default=list(LOOPS))
    parser.add_argument("--norm", choices=["both", *NORMS], default="both")
    parser.add_argument("--steps", type=int, default=440, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per norm (best kept)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    norms = tuple(NORMS) if args.norm == "both" else (args.norm,)
    data = load_digits_split(test_size=TEST_SIZE)
    env = {name: os.environ.get(name, "unset") for name in
           ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_WAIT_POLICY")}
    print(f"fastbn {fastbn.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs; "
          + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"Training steps per second (best of {args.rounds} rounds of {args.steps} steps, an "
          f"eval every {EVAL_EVERY} steps untimed), and the normalization layers' time per step "
          f"and share of it")
    print("| loop | norm | steps/s | norm µs/step | norm share | test accuracy |")
    print("|---|---|---:|---:|---:|---:|")
    results = {}
    for loop in args.loop:
        results[loop] = result = compare(loop, args.steps, args.rounds, data, norms)
        for norm in norms:
            r = result[norm]
            print(f"| {loop} | {norm} | {r['steps_per_s']:,.0f} | {r['norm_us_per_step']:.0f} | "
                  f"{r['share']:.0%} | {r['accuracy']:.3f} |", flush=True)
        if len(norms) == 2:
            f, n = result["fastbn"], result["numpy"]
            gap = np.max(np.abs(np.subtract(f["losses"][:AGREEMENT_STEPS],
                                            n["losses"][:AGREEMENT_STEPS])))
            print(f"| {loop} | fastbn vs numpy | {f['steps_per_s'] / n['steps_per_s']:.2f}x | "
                  f"{n['norm_us_per_step'] / f['norm_us_per_step']:.1f}x less | | losses within "
                  f"{gap:.1e} over {AGREEMENT_STEPS} steps |", flush=True)
    if args.json:
        import json
        for result in results.values():
            for r in result.values():
                r["losses"] = r["losses"][:AGREEMENT_STEPS]
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, steps=args.steps, rounds=args.rounds,
                           loops=results), f, indent=1)


if __name__ == "__main__":
    main()
