"""examples/paper_experiment.py: batch norm trains faster, and folding it changes no output; with
--relu, BN fused with its ReLU trains too. examples/residual_net.py: BN fused with the residual add
and the ReLU trains, as the same steps unfused do, with the same losses.
examples/layer_norm_sequence.py: a transformer block with fastbn.LayerNorm trains, with the losses
of the same model with a NumPy layer norm, and its hand-written backward matches finite
differences."""
import importlib.util
import os

import numpy as np
import pytest
from _util import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example(name):
    """``examples/<name>.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def experiment():
    return _load_example("paper_experiment")


@pytest.fixture(scope="module")
def runs(experiment):
    data = experiment.load_digits_split()
    return {bn: experiment.train(bn, 0.5, 600, data, seed=1, every=25) for bn in (False, True)}


def test_batch_norm_reaches_90_percent_in_fewer_steps(experiment, runs):
    with_bn = experiment.steps_to_reach(runs[True], 0.9)
    without = experiment.steps_to_reach(runs[False], 0.9)
    assert with_bn is not None and with_bn <= 200, runs[True]["accuracy"]
    assert without is None or with_bn < without


def test_folded_network_gives_the_same_outputs(experiment, runs):
    net = runs[True]["network"]
    x_test = experiment.load_digits_split()[2]
    net.train(False)
    expected = net.forward(x_test)
    folded = net.folded()
    assert not folded.batch_norm and not folded.norms
    np.testing.assert_allclose(folded.forward(x_test), expected, rtol=1e-4, atol=1e-4)


def test_numpy_layer_of_the_example_is_batch_norm(experiment, rng):
    """--bn numpy times a plain NumPy layer: it must compute what fastbn's layer computes."""
    import fastbn
    ours, numpy_layer = fastbn.BatchNorm(7), experiment.NumpyBatchNorm(7)
    for step in range(3):
        x = (rng.standard_normal((60, 7)) * 3 + step).astype(np.float32)
        dy = rng.standard_normal((60, 7)).astype(np.float32)
        np.testing.assert_allclose(numpy_layer(x), ours(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(numpy_layer.backward(dy), ours.backward(dy), rtol=1e-4,
                                   atol=1e-5)
        for name in ("gamma", "beta"):
            np.testing.assert_allclose(numpy_layer.grads()[name], ours.grads()[name], rtol=1e-4,
                                       atol=1e-5)
        np.testing.assert_allclose(numpy_layer.running_var, ours.running_var, rtol=1e-5)
    numpy_layer.train(False)
    ours.eval()
    np.testing.assert_allclose(numpy_layer(x), ours(x), rtol=1e-5, atol=1e-5)


def test_numpy_layer_trains_the_network_too(experiment):
    history = experiment.train(True, 0.5, 300, experiment.load_digits_split(), seed=1, every=25,
                               layer=experiment.NumpyBatchNorm)
    assert experiment.steps_to_reach(history, 0.9) is not None, history["accuracy"]
    assert history["steps_per_second"] > 0


# -- --relu: the same networks with ReLUs, BN fused with its ReLU (fastbn.BatchNorm(activation=))


@pytest.fixture(scope="module")
def relu_run(experiment):
    return experiment.train(True, 0.5, 300, experiment.load_digits_split(), seed=1, every=25,
                            activation="relu")


def test_fused_relu_network_trains(experiment, relu_run):
    import fastbn
    assert all(isinstance(bn, fastbn.BatchNorm) for bn in relu_run["network"].norms)
    reached = experiment.steps_to_reach(relu_run, 0.9)
    assert reached is not None and reached <= 200, relu_run["accuracy"]
    assert relu_run["steps_per_second"] > 0


def test_fused_relu_network_folds(experiment, relu_run):
    """Folding each BN into the Linear before it leaves relu(BN(z)) as relu(z W' + b')."""
    net = relu_run["network"]
    x_test = experiment.load_digits_split()[2]
    net.train(False)
    expected = net.forward(x_test)
    folded = net.folded()
    assert folded.activation == "relu" and not folded.norms
    np.testing.assert_allclose(folded.forward(x_test), expected, rtol=1e-4, atol=1e-4)
    net.train(True)


def test_relu_network_backward_matches_finite_differences(experiment):
    """The ReLU network's hand-written backward, with and without the fused BN+ReLU layers:
    a directional derivative of the loss, in float64 arithmetic on float32 parameters."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 16)
    for batch_norm in (False, True):
        net = experiment.Network((5, 7, 6, 3), batch_norm, np.random.default_rng(4),
                                 activation="relu")
        for w in net.weights:
            w *= 10  # units of order 1 with or without BN: few inputs near the ReLUs' kinks

        def loss(net=net):
            scores = net.forward(x).astype(np.float64)
            shifted = scores - scores.max(axis=1, keepdims=True)
            return float(np.mean(np.log(np.exp(shifted).sum(axis=1))
                                 - shifted[np.arange(16), labels]))

        grads = net.backward(experiment.cross_entropy_gradient(net.forward(x), labels))
        grads = [(param, grad.copy()) for param, grad in grads]
        directions = [rng.standard_normal(param.shape).astype(np.float32) for param, _ in grads]
        predicted = sum(float((grad * d).sum()) for (_, grad), d in zip(grads, directions))
        h = 1e-3
        for (param, _), d in zip(grads, directions):
            param += h * d
        plus = loss()
        for (param, _), d in zip(grads, directions):
            param -= 2 * h * d
        minus = loss()
        for (param, _), d in zip(grads, directions):
            param += h * d
        assert (plus - minus) / (2 * h) == pytest.approx(predicted, rel=0.05, abs=1e-3), \
            f"batch_norm={batch_norm}"


# -- examples/residual_net.py: BN + residual add + ReLU, fused and unfused ---------------------


@pytest.fixture(scope="module")
def residual():
    return _load_example("residual_net")


@pytest.fixture(scope="module")
def residual_runs(residual):
    data = residual.load_digits_split()
    return {layer: residual.train(layer, data, 300, seed=2) for layer in residual.LAYERS}


def test_residual_net_trains_fused_and_unfused(residual_runs):
    for layer, run in residual_runs.items():
        assert run["accuracy"] >= 0.85, (layer, run["accuracy"])  # chance: 0.1
        assert run["losses"][-50:].mean() < 0.5 * run["losses"][:10].mean(), layer


def test_residual_net_fused_and_unfused_losses_agree(residual_runs):
    """The same function, weights and batches: the losses agree step for step (float32)."""
    fused, unfused = residual_runs["fused"]["losses"], residual_runs["unfused"]["losses"]
    np.testing.assert_allclose(fused[:30], unfused[:30], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
def test_unfused_layer_of_the_example_matches_the_fused_layer(residual, rng, with_residual):
    """The unfused steps compute what fastbn's fused layer computes, forward and backward."""
    fused, unfused = residual.fused_layer(6), residual.UnfusedBatchNormAddReLU(6)
    for step in range(2):
        x = (rng.standard_normal((40, 6)) * 2 + step).astype(np.float32)
        r = rng.standard_normal((40, 6)).astype(np.float32) if with_residual else None
        dy = rng.standard_normal((40, 6)).astype(np.float32)
        y = fused(x, residual=r)
        np.testing.assert_allclose(y, unfused(x, residual=r), rtol=1e-5, atol=1e-5)
        assert (y >= 0).all() and (y == 0).any()
        got, expected = fused.backward(dy), unfused.backward(dy)
        if with_residual:
            assert isinstance(got, tuple) and len(got) == 2
            np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-6)  # dresidual
            got, expected = got[0], expected[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        for name in ("gamma", "beta"):
            np.testing.assert_allclose(fused.grads()[name], unfused.grads()[name], rtol=1e-4,
                                       atol=1e-5)


def test_residual_net_script_runs():
    """The script's command line, with few steps: its table and the fused/unfused comparison."""
    out = run_python("examples/residual_net.py", "--steps", "200", timeout=300).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("fused", "unfused")}
    assert set(rows) == {"fused", "unfused"}, out
    for cells in rows.values():
        first, last, acc, speed = map(float, cells[1:5])
        assert last < first and acc > 0.5 and speed > 0, out
    assert "largest difference of the training loss" in out, out


# -- examples/layer_norm_sequence.py: a transformer block with fastbn.LayerNorm -----------------


@pytest.fixture(scope="module")
def sequence():
    return _load_example("layer_norm_sequence")


@pytest.fixture(scope="module")
def sequence_runs(sequence):
    data = sequence.load_digits_split()
    return {layer: sequence.train(layer, data, 120, seed=3) for layer in sequence.LAYERS}


def test_layer_norm_sequence_model_trains(sequence_runs):
    for layer, run in sequence_runs.items():
        losses = run["losses"]
        assert losses[-20:].mean() < 0.5 * losses[:10].mean(), (layer, losses)
        assert run["accuracy"] > 0.5, (layer, run["accuracy"])  # chance: 0.1
        assert run["steps_per_second"] > 0


def test_layer_norm_sequence_losses_agree_float32(sequence_runs):
    """The same model, weights and batches with fastbn's and the NumPy layer norm: the losses
    agree step for step to float32 rounding (the model is smooth: no ReLU kinks to amplify it)."""
    np.testing.assert_allclose(sequence_runs["fastbn"]["losses"],
                               sequence_runs["numpy"]["losses"], rtol=1e-5, atol=1e-6)


def test_layer_norm_sequence_losses_agree_float64(sequence):
    data = sequence.load_digits_split()
    fast, plain = (sequence.train(layer, data, 20, dtype=np.float64, seed=4)["losses"]
                   for layer in ("fastbn", "numpy"))
    np.testing.assert_allclose(fast, plain, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_layer_norm_sequence_numpy_layer_is_layer_norm(sequence, rng, affine, dtype):
    """The example's NumPy layer norm computes what fastbn.LayerNorm and fastbn.layer_norm do."""
    import fastbn
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-12}
    ours = fastbn.LayerNorm(6, elementwise_affine=affine, dtype=dtype)
    numpy_layer = sequence.NumpyLayerNorm(6, elementwise_affine=affine, dtype=dtype)
    if affine:
        for layer in (ours, numpy_layer):
            layer.params()["gamma"][...] = np.linspace(0.5, 2, 6)
            layer.params()["beta"][...] = np.linspace(-1, 1, 6)
    x = (rng.standard_normal((5, 4, 6)) * 3 + 2).astype(dtype)
    dy = rng.standard_normal((5, 4, 6)).astype(dtype)
    y = ours(x)
    np.testing.assert_allclose(numpy_layer(x), y, **tol)
    dx = ours.backward(dy)
    np.testing.assert_allclose(numpy_layer.backward(dy), dx, **tol)
    assert set(ours.grads()) == set(numpy_layer.grads())
    for name in ours.grads():
        np.testing.assert_allclose(numpy_layer.grads()[name], ours.grads()[name], **tol)
    # the functional ops, with the layer's parameters
    gamma, beta = ours.params().get("gamma"), ours.params().get("beta")
    y_op, stats = fastbn.layer_norm(x, (6,), gamma, beta)
    np.testing.assert_array_equal(y_op, y)
    dx_op, dgamma, dbeta = fastbn.layer_norm_backward(dy, x, stats, (6,), gamma)
    np.testing.assert_array_equal(dx_op, dx)
    if affine:
        np.testing.assert_array_equal(dgamma, ours.grads()["gamma"])
        np.testing.assert_array_equal(dbeta, ours.grads()["beta"])


@pytest.mark.parametrize("layer", ["fastbn", "numpy"])
def test_layer_norm_sequence_backward_matches_finite_differences(sequence, layer):
    """The model's hand-written backward (attention, GELU, residuals, the layer norms) against
    central differences of the loss, parameter by parameter, in float64."""
    rng = np.random.default_rng(5)
    x = rng.random((6, sequence.TOKENS, sequence.PIXELS))
    labels = rng.integers(0, 10, 6)
    model = sequence.SequenceModel(8, 12, 10, np.random.default_rng(6), sequence.LAYERS[layer],
                                   np.float64)
    for ln in (model.ln1, model.ln2):  # away from their initial ones and zeros
        ln.params()["gamma"][...] = 1 + 0.3 * rng.standard_normal(8)
        ln.params()["beta"][...] = 0.3 * rng.standard_normal(8)
    for name in ("b_e", "b_1", "b_2", "b_c"):
        model.p[name][...] = 0.3 * rng.standard_normal(model.p[name].shape)

    def loss():
        return sequence.cross_entropy(model.forward(x), labels)[0]

    grads = model.backward(sequence.cross_entropy(model.forward(x), labels)[1])
    assert len({name for name, _, _ in grads}) == len(model.p) + 4
    h = 1e-6
    for name, param, grad in grads:
        grad = grad.copy()
        direction = rng.standard_normal(param.shape)
        param += h * direction
        plus = loss()
        param -= 2 * h * direction
        minus = loss()
        param += h * direction
        predicted = float((grad * direction).sum())
        assert (plus - minus) / (2 * h) == pytest.approx(predicted, rel=1e-6, abs=1e-9), name


def test_layer_norm_sequence_script_runs():
    out = run_python("examples/layer_norm_sequence.py", "--steps", "100", timeout=300).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("fastbn", "numpy")}
    assert set(rows) == {"fastbn", "numpy"}, out
    for cells in rows.values():
        first, last, acc, speed = map(float, cells[1:5])
        assert last < first and acc > 0.3 and speed > 0, out
    assert "largest difference of the training loss" in out, out
