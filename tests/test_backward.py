"""backward() against the reference, the forward->backward round trip, and finite differences."""
import numpy as np
import pytest

import fastbn

import reference
from _util import (each_dtype, each_layout, each_mode, make_affine, make_case, make_running,
                   make_x, numeric_grad, plain_or_affine)
from checks import check_backward, check_forward_backward, reference_stats


@plain_or_affine
@each_mode
@each_dtype
@each_layout
def test_backward_matches_reference(layout, dtype, training, affine, rng):
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    dy = make_x(rng, shape, axis, dtype)
    gamma = make_affine(rng, c)[0] if affine else None
    mean, invstd = reference_stats(rng, x, axis, training)
    check_backward(dy, x, mean, invstd, gamma, axis, training)


@each_mode
@each_dtype
@each_layout
def test_round_trip_with_fastbn_stats(layout, dtype, training, rng):
    """forward -> backward using the stats forward returned, against the reference chain."""
    x, dy, gamma, beta, rm, rv = make_case(rng, layout.small, layout.axis, dtype)
    check_forward_backward(x, dy, gamma, beta, axis=layout.axis, training=training,
                           running=(rm, rv), reference_chain=True)


@pytest.mark.parametrize("gdtype", [np.float32, np.float64], ids=["g32", "g64"])
@each_dtype
def test_parameter_gradient_dtype_follows_gamma(dtype, gdtype, rng):
    x = make_x(rng, (4, 3, 7, 9), 1, dtype)
    dy = make_x(rng, (4, 3, 7, 9), 1, dtype)
    gamma = make_affine(rng, 3, gdtype)[0]
    _, mean, invstd, _, _ = reference.forward(x, axis=1)
    check_backward(dy, x, mean, invstd, gamma, 1, True)
    check_backward(dy, x, mean, invstd, None, 1, True)


def test_gamma_as_list(rng):
    x = make_x(rng, (6, 4), 1)
    dy = make_x(rng, (6, 4), 1)
    _, stats = fastbn.forward(x)
    g_list = [1.5, -0.5, 2.0, 1.0]
    a = fastbn.backward(dy, x, stats, g_list)
    b = fastbn.backward(dy, x, stats, np.array(g_list))
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


def test_dy_as_list(rng):
    x = make_x(rng, (6, 4), 1)
    dy = make_x(rng, (6, 4), 1)
    _, stats = fastbn.forward(x)
    a = fastbn.backward(dy.tolist(), x.tolist(), stats)
    b = fastbn.backward(dy, x, stats)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


# ---------------------------------------------------------------- finite differences

def _loss(x, gamma, beta, w, axis, training, rm, rv):
    y, _ = fastbn.forward(x, gamma, beta, axis=axis, training=training,
                          running_mean=None if training else rm,
                          running_var=None if training else rv)
    return float(np.sum(y * w))


@plain_or_affine
@each_mode
@pytest.mark.parametrize("shape,axis", [((3, 2, 4), 1), ((5, 3), 1), ((2, 3, 2, 3), -1)],
                         ids=["NCL", "NxD", "NHWC"])
def test_finite_differences(shape, axis, training, affine, rng):
    c = shape[axis]
    x = make_x(rng, shape, axis)
    w = rng.standard_normal(shape)
    if affine:
        gamma, beta = make_affine(rng, c)
    else:
        gamma, beta = np.ones(c), np.zeros(c)
    rm, rv = make_running(rng, c)

    def f():
        return _loss(x, gamma if affine else None, beta if affine else None, w, axis, training,
                     rm, rv)

    _, stats = fastbn.forward(x, gamma, beta, axis=axis, training=training,
                              running_mean=None if training else rm,
                              running_var=None if training else rv)
    dx, dgamma, dbeta = fastbn.backward(w, x, stats, gamma if affine else None, axis=axis,
                                        training=training)

    num_dx = numeric_grad(f, x)
    # gradients w.r.t. gamma and beta: perturb the arrays actually passed (ones/zeros if plain)
    def fg():
        return _loss(x, gamma, beta, w, axis, training, rm, rv)
    num_dgamma = numeric_grad(fg, gamma)
    num_dbeta = numeric_grad(fg, beta)

    np.testing.assert_allclose(dx, num_dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dgamma, num_dgamma, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dbeta, num_dbeta, rtol=1e-5, atol=1e-6)
    assert np.abs(num_dx).max() > 1e-3  # the check is not vacuous
