"""A tiny transformer in plain NumPy with fastbn.LayerNorm, on digits read as sequences of rows.

Each of scikit-learn's handwritten digits (8×8 images, no download) is a sequence of 8 tokens, one
per row of 8 pixels. The model, a pre-LN transformer block of width D (hand-written forward and
backward, trained by Adam):

    embed:      h = x W_e + b_e + pos                   (x: B×8×8, h: B×8×D)
    attention:  h = h + softmax(q kᵀ/√D) v W_o           q, k, v = LN₁(h) W_q, W_k, W_v
    MLP:        h = h + gelu(LN₂(h) W_1 + b_1) W_2 + b_2
    head:       scores = mean over tokens of LN₃(h), times W_c, plus b_c   (LN₃ without affine)

trained twice from the same initial weights on the same batches: with ``fastbn.LayerNorm``, and
with a layer norm written below in plain NumPy (the textbook equations, in the data's dtype). Both
compute the same function, so their training losses agree step for step up to the rounding of the
dtype (float32: ~1e-6 over 1000 steps; float64: ~1e-15); the run prints each one's test accuracy
and training steps per second. At these sizes (B·8 = 512 rows of D = 32 per call) a layer norm is a
small part of a step and fastbn's costs about what NumPy's does: the point here is the same
training with fastbn's layer (float64 statistics, each output rounded once, torch.nn.LayerNorm's
interface), not speed.

    pip install -e ".[examples]"
    python examples/layer_norm_sequence.py [--steps 1000] [--width 32] [--dtype float32]
                                         [--blas-threads N]
"""
import argparse
import os
import sys
import time

import numpy as np

import fastbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paper_experiment import load_digits_split  # noqa: E402

BATCH = 64
TOKENS = PIXELS = 8  # 8 rows of 8 pixels


class NumpyLayerNorm:
    """Layer norm over the last axis in plain NumPy, in the input's dtype, with the parts of
    ``fastbn.LayerNorm``'s interface this model uses: the baseline of the comparison."""

    def __init__(self, width, *, eps=1e-5, elementwise_affine=True, dtype=np.float32):
        self.eps, self.affine = eps, elementwise_affine
        self.gamma = np.ones(width, dtype) if elementwise_affine else None
        self.beta = np.zeros(width, dtype) if elementwise_affine else None
        self.dgamma = self.dbeta = None

    def train(self, mode=True):
        return self

    def __call__(self, x):
        mean = x.mean(axis=-1, keepdims=True)
        self.invstd = 1 / np.sqrt(x.var(axis=-1, keepdims=True) + self.eps)
        self.xhat = (x - mean) * self.invstd
        return self.gamma * self.xhat + self.beta if self.affine else self.xhat

    def backward(self, dy):
        axes = tuple(range(dy.ndim - 1))
        if self.affine:
            self.dgamma, self.dbeta = (dy * self.xhat).sum(axis=axes), dy.sum(axis=axes)
            dy = dy * self.gamma
        return self.invstd * (dy - dy.mean(axis=-1, keepdims=True)
                              - self.xhat * (dy * self.xhat).mean(axis=-1, keepdims=True))

    def params(self):
        return {"gamma": self.gamma, "beta": self.beta} if self.affine else {}

    def grads(self):
        return {"gamma": self.dgamma, "beta": self.dbeta} if self.affine else {}


LAYERS = {"fastbn": fastbn.LayerNorm, "numpy": NumpyLayerNorm}


class SequenceModel:
    """The model above; ``layer`` makes each layer norm (a value of LAYERS)."""

    def __init__(self, width, hidden, n_out, rng, layer, dtype=np.float32):
        def init(*shape, fan_in):
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)
        d = width
        self.p = {"w_e": init(PIXELS, d, fan_in=PIXELS), "b_e": np.zeros(d, dtype),
                  "pos": init(TOKENS, d, fan_in=1) * 0.1,
                  "w_q": init(d, d, fan_in=d), "w_k": init(d, d, fan_in=d),
                  "w_v": init(d, d, fan_in=d), "w_o": init(d, d, fan_in=d),
                  "w_1": init(d, hidden, fan_in=d), "b_1": np.zeros(hidden, dtype),
                  "w_2": init(hidden, d, fan_in=hidden), "b_2": np.zeros(d, dtype),
                  "w_c": init(d, n_out, fan_in=d), "b_c": np.zeros(n_out, dtype)}
        self.ln1, self.ln2 = layer(d, dtype=dtype), layer(d, dtype=dtype)
        self.ln3 = layer(d, elementwise_affine=False, dtype=dtype)
        self.scale = 1 / float(np.sqrt(d))  # a Python float: keeps the dtype

    def train(self, mode=True):
        for ln in (self.ln1, self.ln2, self.ln3):
            ln.train(mode)

    def forward(self, x):
        """Class scores for x (B×8×8); keeps what backward needs."""
        p, c = self.p, {"x": x}
        h = x @ p["w_e"] + p["b_e"] + p["pos"]
        c["a"] = a = self.ln1(h)
        c["q"], c["k"], c["v"] = a @ p["w_q"], a @ p["w_k"], a @ p["w_v"]
        s = c["q"] @ c["k"].transpose(0, 2, 1) * self.scale
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        c["att"] = att = e / e.sum(axis=-1, keepdims=True)
        c["o"] = o = att @ c["v"]
        h = h + o @ p["w_o"]
        c["m"] = m = self.ln2(h)
        c["z"] = z = m @ p["w_1"] + p["b_1"]
        c["u"], c["du_dz"] = gelu(z)
        h = h + c["u"] @ p["w_2"] + p["b_2"]
        c["pooled"] = pooled = self.ln3(h).mean(axis=1)
        self.cache = c
        return pooled @ p["w_c"] + p["b_c"]

    def backward(self, dscores):
        """Gradients of every parameter, as ``[(name, array, gradient), ...]``."""
        p, c = self.p, self.cache
        g = {"w_c": c["pooled"].T @ dscores, "b_c": dscores.sum(axis=0)}

        def weight(inputs, d_out):  # the gradient of a weight applied to every token
            return inputs.reshape(-1, inputs.shape[-1]).T @ d_out.reshape(-1, d_out.shape[-1])

        dpooled = dscores @ p["w_c"].T / TOKENS
        dh = self.ln3.backward(np.repeat(dpooled[:, None, :], TOKENS, axis=1))
        # the MLP's residual block
        g["w_2"], g["b_2"] = weight(c["u"], dh), dh.sum(axis=(0, 1))
        dz = (dh @ p["w_2"].T) * c["du_dz"]
        g["w_1"], g["b_1"] = weight(c["m"], dz), dz.sum(axis=(0, 1))
        dh = dh + self.ln2.backward(dz @ p["w_1"].T)
        # the attention's residual block
        g["w_o"] = weight(c["o"], dh)
        do = dh @ p["w_o"].T
        att = c["att"]
        datt = do @ c["v"].transpose(0, 2, 1)
        dv = att.transpose(0, 2, 1) @ do
        ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) * self.scale
        dq, dk = ds @ c["k"], ds.transpose(0, 2, 1) @ c["q"]
        g["w_q"], g["w_k"], g["w_v"] = weight(c["a"], dq), weight(c["a"], dk), weight(c["a"], dv)
        da = dq @ p["w_q"].T + dk @ p["w_k"].T + dv @ p["w_v"].T
        dh = dh + self.ln1.backward(da)
        # the embedding
        g["w_e"], g["b_e"], g["pos"] = weight(c["x"], dh), dh.sum(axis=(0, 1)), dh.sum(axis=0)
        grads = [(name, p[name], g[name]) for name in p]
        for i, ln in enumerate((self.ln1, self.ln2), 1):
            grads += [(f"ln{i}.{name}", ln.params()[name], ln.grads()[name])
                      for name in ("gamma", "beta")]
        return grads


def gelu(z):
    """GELU (the tanh form, as GPT-2's) and its derivative. Smooth, unlike a ReLU: at a ReLU's
    kink a rounding difference between the two layer norms switches a unit's gradient on or off,
    and the two runs' losses part by 1e-4 in a few steps."""
    c, z2 = float(np.sqrt(2 / np.pi)), z * z  # Python floats keep z's dtype
    t = np.tanh(c * z * (1 + 0.044715 * z2))
    half = 0.5 * (1 + t)
    return z * half, half + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z2)


def cross_entropy(scores, labels):
    """The mean softmax cross-entropy, and its gradient with respect to the scores."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    total = p.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, labels]))
    p /= total
    p[rows, labels] -= 1
    return loss, p / p.dtype.type(len(labels))


class Adam:
    """Adam (Kingma & Ba), updating the parameters in place; state keyed by parameter name."""

    def __init__(self, learning_rate, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = learning_rate, beta1, beta2, eps
        self.m, self.v, self.t = {}, {}, 0

    def step(self, grads):
        self.t += 1
        lr = self.lr * float(np.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t))
        for name, param, grad in grads:
            m = self.m.setdefault(name, np.zeros_like(param))
            v = self.v.setdefault(name, np.zeros_like(param))
            m += (1 - self.beta1) * (grad - m)
            v += (1 - self.beta2) * (grad * grad - v)
            param -= lr * m / (np.sqrt(v) + self.eps)


def as_sequences(x):
    return np.ascontiguousarray(x.reshape(-1, TOKENS, PIXELS))


def accuracy(model, x, y):
    model.train(False)
    predicted = model.forward(as_sequences(x)).argmax(axis=1)
    model.train(True)
    return float((predicted == y).mean())


def train(layer, data, steps, width=32, hidden=64, learning_rate=3e-3, dtype=np.float32, seed=0,
          blas_threads=None):
    """Train one model with layer norms ``layer`` (a key of LAYERS); returns ``{"losses": the
    training loss of each step, "accuracy": the final test accuracy, "steps_per_second": one over
    the median time of a training step (forward, backward, update: the median, to be fair on a
    shared machine), "model"}``. The same ``seed`` gives the same initial weights and batches
    whatever the layer. ``blas_threads`` limits the BLAS's threads (by threadpoolctl, which comes
    with scikit-learn); None, the default, leaves NumPy's own setting, as users run."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(blas_threads, user_api="blas"):
        return _train(layer, data, steps, width, hidden, learning_rate, dtype, seed)


def _train(layer, data, steps, width, hidden, learning_rate, dtype, seed):
    x_train, y_train, x_test, y_test = data
    x_train = as_sequences(x_train).astype(dtype)
    rng = np.random.default_rng(seed)
    model = SequenceModel(width, hidden, 10, rng, LAYERS[layer], dtype)
    adam, losses, seconds = Adam(learning_rate), [], []
    for _ in range(steps):
        start = time.perf_counter()
        batch = rng.integers(0, len(x_train), BATCH)
        loss, dscores = cross_entropy(model.forward(x_train[batch]), y_train[batch])
        adam.step(model.backward(dscores))
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
    return {"losses": np.array(losses), "accuracy": accuracy(model, x_test.astype(dtype), y_test),
            "steps_per_second": 1 / np.median(seconds), "model": model}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="limit the BLAS's threads (default: NumPy's own setting)")
    args = parser.parse_args()
    data = load_digits_split()
    options = {"width": args.width, "hidden": args.hidden, "learning_rate": args.learning_rate,
               "dtype": np.dtype(args.dtype).type, "seed": args.seed,
               "blas_threads": args.blas_threads}
    for layer in LAYERS:  # the warm-up: compiles fastbn's kernels, or loads them from the cache
        train(layer, data, 2, **options)
    runs = {layer: train(layer, data, args.steps, **options) for layer in LAYERS}
    print(f"one transformer block of width {args.width} (MLP {args.hidden}) on 8 tokens of 8 "
          f"pixels, {args.steps} Adam steps of {BATCH} digits, learning rate "
          f"{args.learning_rate:g}, {args.dtype}")
    print(f"{'layer norm':10s} {'first loss':>10s} {'final loss':>10s} {'test accuracy':>13s} "
          f"{'steps/s':>8s}")
    for layer, run in runs.items():
        last = run["losses"][-50:].mean()  # the mean over the last 50 steps: less noisy
        print(f"{layer:10s} {run['losses'][0]:10.4f} {last:10.4f} {run['accuracy']:13.3f} "
              f"{run['steps_per_second']:8.0f}")
    difference = np.abs(runs["fastbn"]["losses"] - runs["numpy"]["losses"])
    first = min(50, args.steps)
    speedup = runs["fastbn"]["steps_per_second"] / runs["numpy"]["steps_per_second"]
    print(f"largest difference of the training loss, fastbn against numpy: "
          f"{difference[:first].max():.1e} over the first {first} steps, "
          f"{difference.max():.1e} over all {args.steps}; fastbn takes {speedup:.2f} times the "
          f"steps per second of numpy")


if __name__ == "__main__":
    main()
