"""examples/paper_experiment.py: batch norm trains faster, and folding it changes no output."""
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location(
        "paper_experiment", os.path.join(ROOT, "examples", "paper_experiment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
