"""forward() against the float64 reference: every layout x dtype x mode x affine."""
import numpy as np
import pytest

import fastbn

import reference
from _util import (assert_close, each_dtype, each_layout, each_mode, make_affine, make_running,
                   make_x, plain_or_affine)
from checks import check_backward, check_forward


@plain_or_affine
@each_mode
@each_dtype
@each_layout
def test_forward_matches_reference(layout, dtype, training, affine, rng):
    shape, axis = layout.small, layout.axis
    x = make_x(rng, shape, axis, dtype)
    gamma, beta = make_affine(rng, shape[axis]) if affine else (None, None)
    check_forward(x, gamma, beta, axis=axis, training=training, rng=rng)


@each_layout
def test_forward_training_without_running_stats(layout, rng):
    x = make_x(rng, layout.small, layout.axis)
    check_forward(x, axis=layout.axis, training=True, running=False)


@each_dtype
@each_layout
def test_positive_and_negative_axis_agree(layout, dtype, rng):
    x = make_x(rng, layout.small, layout.axis, dtype)
    ndim = x.ndim
    pos = layout.axis % ndim
    y1, s1 = fastbn.forward(x, axis=pos)
    y2, s2 = fastbn.forward(x, axis=pos - ndim)
    assert np.array_equal(y1, y2)
    assert np.array_equal(s1.mean, s2.mean) and np.array_equal(s1.invstd, s2.invstd)


@pytest.mark.parametrize("shape,axis", [
    ((2, 3), 0), ((5, 4, 3), 0), ((5, 4, 3), 2), ((3, 4, 5, 6), 2), ((3, 4, 5, 6), -2),
    ((6, 5, 4, 3, 2), 3), ((2, 3, 4, 5, 6), -1),
])
@each_dtype
def test_other_axes(shape, axis, dtype, rng):
    x = make_x(rng, shape, axis, dtype)
    gamma, beta = make_affine(rng, shape[axis])
    check_forward(x, gamma, beta, axis=axis, training=True, rng=rng)
    check_forward(x, gamma, beta, axis=axis, training=False, rng=rng)


@pytest.mark.parametrize("shape,axis", [
    ((1, 3, 1, 5), 1), ((2, 1, 3), 1), ((5, 3, 1, 1), 1), ((1, 1, 4, 1), 1), ((7, 1), 1),
    ((1, 5, 1, 3), -1), ((2, 1), 0), ((1, 2, 1), 1),
])
@each_dtype
def test_size_one_dimensions(shape, axis, dtype, rng):
    x = make_x(rng, shape, axis, dtype)
    gamma, beta = make_affine(rng, shape[axis])
    m = x.size // shape[axis]
    if m > 1:
        check_forward(x, gamma, beta, axis=axis, training=True, rng=rng)
    check_forward(x, gamma, beta, axis=axis, training=False, rng=rng)


@each_dtype
def test_eval_with_a_single_sample(dtype, rng):
    """One value per channel is an error in training only; eval just applies the map."""
    x = make_x(rng, (1, 6), 1, dtype)
    gamma, beta = make_affine(rng, 6)
    check_forward(x, gamma, beta, axis=1, training=False, rng=rng)


@pytest.mark.parametrize("eps", [1e-3, 1e-5, 0.5])
@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
def test_eps_and_momentum(eps, momentum, rng):
    x = make_x(rng, (4, 3, 7, 9), 1, scale=0.05)  # small variance: eps matters
    gamma, beta = make_affine(rng, 3)
    check_forward(x, gamma, beta, axis=1, training=True, momentum=momentum, eps=eps, rng=rng)
    check_forward(x, gamma, beta, axis=1, training=False, momentum=momentum, eps=eps, rng=rng)


@pytest.mark.parametrize("pdtype", [np.float32, np.float64, np.int64, np.int32],
                         ids=["f32", "f64", "i64", "i32"])
def test_gamma_beta_dtypes_computed_in_float64(pdtype, rng):
    x = make_x(rng, (5, 3, 29), 1)
    gamma = np.array([2, -1, 3]).astype(pdtype)
    beta = np.array([1, 0, -2]).astype(pdtype)
    y, _ = check_forward(x, gamma, beta, axis=1, rng=rng)
    y64, _ = fastbn.forward(x, gamma.astype(np.float64), beta.astype(np.float64), axis=1)
    assert np.array_equal(y, y64)


def test_array_likes_are_accepted(rng):
    x = make_x(rng, (6, 4), 1)
    gamma = [1.5, -0.5, 2.0, 1.0]
    beta = [0.0, 1.0, -1.0, 0.5]
    y, stats = fastbn.forward(x.tolist(), gamma, beta, axis=1)
    ry, rmean, rinvstd, _, _ = reference.forward(x, gamma, beta, 1)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64 and y.shape == x.shape
    assert_close(y, ry, 1e-10)
    assert_close(stats.mean, rmean, 1e-10)
    assert_close(stats.invstd, rinvstd, 1e-10)


@pytest.mark.parametrize("rdtype", [np.float32, np.float64], ids=["run32", "run64"])
@each_dtype
def test_running_stats_in_their_own_dtype(dtype, rdtype, rng):
    x = make_x(rng, (4, 6, 7, 5), -1, dtype)
    check_forward(x, axis=-1, training=True, running_dtype=rdtype, rng=rng)
    check_forward(x, axis=-1, training=False, running_dtype=rdtype, rng=rng)


def test_eval_stats_are_running_stats(rng):
    x = make_x(rng, (5, 3, 29), 1, np.float32)
    rm, rv = make_running(rng, 3, np.float32)
    _, stats = fastbn.forward(x, axis=1, training=False, running_mean=rm, running_var=rv, eps=1e-3)
    assert stats.mean.dtype == np.float64 and stats.invstd.dtype == np.float64
    assert np.array_equal(stats.mean, rm.astype(np.float64))
    assert_close(stats.invstd, 1.0 / np.sqrt(rv.astype(np.float64) + 1e-3), 1e-12)


def test_batchstats_is_a_namedtuple():
    s = fastbn.BatchStats(np.zeros(2), np.ones(2))
    assert isinstance(s, tuple) and s._fields == ("mean", "invstd")
    mean, invstd = s
    assert mean is s.mean and invstd is s.invstd


@each_layout
def test_device_cpu_same_as_default(layout, rng):
    x = make_x(rng, layout.small, layout.axis, np.float32)
    y1, s1 = fastbn.forward(x, axis=layout.axis)
    y2, s2 = fastbn.forward(x, axis=layout.axis, device="cpu")
    assert np.array_equal(y1, y2) and np.array_equal(s1.mean, s2.mean)
    assert np.array_equal(s1.invstd, s2.invstd)
    dy = make_x(rng, layout.small, layout.axis, np.float32)
    g1 = fastbn.backward(dy, x, s1, axis=layout.axis)
    g2 = fastbn.backward(dy, x, s1, axis=layout.axis, device="cpu")
    for a, b in zip(g1, g2):
        assert np.array_equal(a, b)


# Shapes with more rows than the LAYOUTS' small ones: at the tests' block sizes a channels-last
# work item then spans several tiles, and planar channels many chunks of several rows.
LONGER = [("NHWC-long", (16, 12, 10, 5), -1), ("NxD-long", (300, 130), 1),
          ("NxD-narrow", (2000, 3), 1), ("NCL-short-rows", (400, 2, 3), 1)]


@each_mode
@each_dtype
@pytest.mark.parametrize("name,shape,axis", LONGER, ids=[c[0] for c in LONGER])
def test_more_rows_forward_backward(name, shape, axis, dtype, training, rng):
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype, offset=rng.uniform(-20, 20, c))
    gamma, beta = make_affine(rng, c)
    y, stats = check_forward(x, gamma, beta, axis=axis, training=training, rng=rng)
    dy = make_x(rng, shape, axis, dtype)
    check_backward(dy, x, stats.mean, stats.invstd, gamma, axis, training)


@pytest.mark.parametrize("which", ["gamma_only", "beta_only"])
@each_mode
@each_layout
def test_gamma_or_beta_alone(layout, training, which, rng):
    shape, axis = layout.small, layout.axis
    x = make_x(rng, shape, axis, np.float64)
    gamma, beta = make_affine(rng, shape[axis])
    if which == "gamma_only":
        beta = None
    else:
        gamma = None
    y, stats = check_forward(x, gamma, beta, axis=axis, training=training, rng=rng)
    dy = make_x(rng, shape, axis)
    check_backward(dy, x, stats.mean, stats.invstd, gamma, axis, training)
