"""examples/training_loops.py and bench/loops.py: the four NumPy training loops train, with
fastbn's layers as with NumPy ones, to the same losses; the NumPy layers they time are the ops
they stand for; the hand-written backward of each network matches finite differences."""
import importlib.util
import os

import numpy as np
import pytest
import reference
from _util import ROOT, run_python

import fastbn


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loops():
    return _load("examples/training_loops.py", "training_loops")


@pytest.fixture(scope="module")
def data(loops):
    return loops.load_digits_split(test_size=loops.TEST_SIZE)


@pytest.mark.parametrize("shape, axis", [((40, 6), 1), ((8, 5, 3, 4), 1), ((8, 3, 4, 5), -1)])
def test_numpy_batch_norm_is_batch_norm(loops, rng, shape, axis):
    """The NumPy layer the loops time computes batch norm (tests/reference.py), running
    statistics and eval included."""
    layer = loops.NumpyBatchNorm(shape[axis], axis=axis, dtype=np.float64)
    layer.gamma[:] = rng.uniform(0.5, 2, shape[axis])
    layer.beta[:] = rng.standard_normal(shape[axis])
    running_mean, running_var = np.zeros(shape[axis]), np.ones(shape[axis])
    for step in range(2):
        x = rng.standard_normal(shape) * 3 + step
        dy = rng.standard_normal(shape)
        y, mean, invstd, running_mean, running_var = reference.forward(
            x, layer.gamma, layer.beta, axis=axis, running_mean=running_mean,
            running_var=running_var)
        np.testing.assert_allclose(layer(x), y, rtol=1e-12, atol=1e-12)
        dx, dgamma, dbeta = reference.backward(dy, x, mean, invstd, layer.gamma, axis=axis)
        np.testing.assert_allclose(layer.backward(dy), dx, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.grads()["gamma"], dgamma, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.grads()["beta"], dbeta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.running_var, running_var, rtol=1e-12)
    layer.train(False)
    y = reference.forward(x, layer.gamma, layer.beta, axis=axis, training=False,
                          running_mean=running_mean, running_var=running_var)[0]
    np.testing.assert_allclose(layer(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_residual", [False, True])
def test_numpy_fused_layer_is_fastbns(loops, rng, with_residual):
    ours, theirs = fastbn.BatchNorm(6, activation="relu"), loops.NumpyBatchNormAddReLU(6)
    x = rng.standard_normal((30, 6)).astype(np.float32)
    skip = rng.standard_normal((30, 6)).astype(np.float32) if with_residual else None
    dy = rng.standard_normal((30, 6)).astype(np.float32)
    np.testing.assert_allclose(theirs(x, residual=skip), ours(x, residual=skip), atol=1e-5)
    got, expected = theirs.backward(dy), ours.backward(dy)
    for a, b in zip(*(((g,) if not with_residual else g) for g in (got, expected))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _float64_batch_norm(loops):
    """The NumPy batch norm computed in float64 (inputs and results float32): the reference the
    fastbn runs agree with, where NumPy's float32 batch norm loses digits (the conv loop's
    channels of many equal values)."""

    class Float64BatchNorm(loops.NumpyBatchNorm):
        def __call__(self, x):
            return super().__call__(x.astype(np.float64)).astype(np.float32)

        def backward(self, dy):
            return super().backward(dy.astype(np.float64)).astype(np.float32)

    return Float64BatchNorm


@pytest.mark.parametrize("loop", ["mlp", "conv", "layernorm", "residual"])
def test_loops_train_to_the_same_losses(loops, data, loop, monkeypatch):
    monkeypatch.setitem(loops.NORMS, "float64", lambda: dict(
        loops.numpy_layers(), batch=_float64_batch_norm(loops)))
    result = loops.compare(loop, 40, 1, data, norms=("fastbn", "numpy", "float64"))
    losses = {norm: np.array(r["losses"]) for norm, r in result.items()}
    assert losses["fastbn"][-5:].mean() < 0.6 * losses["fastbn"][:5].mean(), losses["fastbn"]
    reference_run = "numpy" if loop == "layernorm" else "float64"
    # Over the first steps: later, rounding differences grow as training goes on (a max-pool
    # window whose two largest values swap, say), as between any two implementations.
    np.testing.assert_allclose(losses["fastbn"][:25], losses[reference_run][:25], atol=1e-5)
    for r in result.values():
        assert r["steps_per_s"] > 0 and 0 < r["share"] < 1 and r["norm_us_per_step"] > 0
        assert len(r["losses"]) == 42 and 0 <= r["accuracy"] <= 1


@pytest.mark.parametrize("loop", ["mlp", "conv", "layernorm", "residual"])
def test_loop_backward_matches_finite_differences(loops, data, loop):
    """The networks' hand-written backward (im2col convolution, pooling, tokens, residual and
    pre-norm blocks) against a central difference of the loss along one random direction per
    parameter, with the NumPy layers."""
    run = loops.Run(loop, "numpy", data)
    x, labels = run.x_train[:16], run.y_train[:16]
    rng = np.random.default_rng(5)

    def loss():
        return loops.cross_entropy(run.model(x).astype(np.float64), labels)[0]

    _, dscores = loops.cross_entropy(run.model(x), labels)
    run.model.backward(dscores)
    params = [(p, g.copy()) for p, g in run.model.parameters()]
    assert len(params) >= 4
    h = 1.0
    for param, grad in params:
        # a step of 1e-3 of the parameter's own size: few ReLU inputs cross their kink
        direction = rng.standard_normal(param.shape)
        direction *= 1e-3 * max(np.linalg.norm(param), 1.0) / np.linalg.norm(direction)
        direction = direction.astype(np.float32)
        param += h * direction
        plus = loss()
        param -= 2 * h * direction
        minus = loss()
        param += h * direction
        predicted = float((grad.astype(np.float64) * direction).sum())
        assert (plus - minus) / (2 * h) == pytest.approx(predicted, rel=0.05, abs=2e-3)


def test_loops_script_prints_its_table():
    out = run_python("examples/training_loops.py", "--loop", "mlp", "residual", "--steps", "10",
                     "--rounds", "1", timeout=300).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [r[1].strip() for r in rows[1:]] == ["fastbn", "numpy", "fastbn vs numpy"] * 2, out
    assert "losses within" in out


def test_bench_loops_runs_each_setting(tmp_path):
    table = tmp_path / "loops.md"
    run_python("bench/loops.py", "--loop", "mlp", "--steps", "5", "--rounds", "1", "--markdown",
               str(table), timeout=600)
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines()
            if line.startswith("| mlp")]
    assert [r[1].strip() for r in rows] == ["default", "OPENBLAS_NUM_THREADS=1",
                                            "NUMBA_NUM_THREADS=1"]
    assert all(float(r[4].strip(" x")) > 0 for r in rows)
