"""hypothesis: random shapes, axes, dtypes, offsets and scales, against the reference."""
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastbn

import reference
from _util import assert_close, numeric_grad, tol_for
from checks import check_forward_backward

# the autouse block-size fixture is function scoped but constant across examples
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    training = draw(st.booleans())
    affine = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    log_scale = draw(st.floats(-3, 3))
    rel_offset = draw(st.floats(-1e3, 1e3))   # offset in units of the spread
    return shape, axis, dtype, training, affine, seed, 10.0 ** log_scale, rel_offset


def _data(shape, axis, dtype, seed, scale, rel_offset, training=True):
    """(rng, c, x) for a case; rejects (hypothesis.assume) training on one value per channel."""
    c = shape[axis]
    assume(not training or int(np.prod(shape)) // c > 1)
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal(shape) + rel_offset) * scale).astype(dtype)
    return rng, c, x


@SETTINGS
@given(cases())
def test_random_forward_backward(case):
    shape, axis, dtype, training, affine, seed, scale, rel_offset = case
    rng, c, x = _data(shape, axis, dtype, seed, scale, rel_offset, training)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = (rng.uniform(-2, 2, c), rng.uniform(-2, 2, c)) if affine else (None, None)
    rm = (rng.uniform(-1, 1, c) * scale + rel_offset * scale)
    rv = rng.uniform(0.5, 2.0, c) * scale ** 2
    check_forward_backward(x, dy, gamma, beta, axis=axis, training=training, running=(rm, rv))


@SETTINGS
@given(cases())
def test_normalized_output_has_zero_mean_unit_variance(case):
    shape, axis, dtype, _, _, seed, scale, rel_offset = case
    _, c, x = _data(shape, axis, dtype, seed, scale, rel_offset)
    eps = 1e-5
    y, stats = fastbn.forward(x, axis=axis, eps=eps)
    rows = np.moveaxis(y.astype(np.float64), axis, -1).reshape(-1, c)
    tol = tol_for(dtype)
    np.testing.assert_allclose(rows.mean(axis=0), 0.0, atol=10 * tol)
    # var(y) = var / (var + eps) = 1 - eps * invstd^2 (below 1 when var is comparable to eps)
    expected_var = 1.0 - eps * stats.invstd ** 2
    np.testing.assert_allclose(rows.var(axis=0), expected_var, atol=10 * tol)
    # and the statistics really are the batch's
    _, rmean, rinvstd, _, _ = reference.forward(x, axis=axis, eps=eps)
    assert_close(stats.invstd, rinvstd, tol)


@SETTINGS
@given(cases())
def test_affine_is_applied_after_normalization(case):
    """y(gamma, beta) = gamma * y(1, 0) + beta, channel by channel."""
    shape, axis, dtype, training, _, seed, scale, rel_offset = case
    rng, c, x = _data(shape, axis, dtype, seed, scale, rel_offset, training)
    gamma, beta = rng.uniform(-2, 2, c), rng.uniform(-2, 2, c)
    rm, rv = rng.uniform(-1, 1, c), rng.uniform(0.5, 2, c)
    kw = dict(axis=axis, training=training, running_mean=rm.copy(), running_var=rv.copy())
    y0, _ = fastbn.forward(x, **kw)
    kw = dict(axis=axis, training=training, running_mean=rm.copy(), running_var=rv.copy())
    y1, _ = fastbn.forward(x, gamma, beta, **kw)
    sh = [1] * len(shape)
    sh[axis] = c
    expected = gamma.reshape(sh) * y0.astype(np.float64) + beta.reshape(sh)
    assert_close(y1, expected, 4 * tol_for(dtype))


@st.composite
def views(draw):
    """A random strided view: a bigger array, sliced with steps (some negative), transposed."""
    ndim = draw(st.integers(2, 5))
    shape = draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
    steps = draw(st.lists(st.sampled_from([1, 1, 2, -1, -2]), min_size=ndim, max_size=ndim))
    perm = draw(st.permutations(range(ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    training = draw(st.booleans())
    fortran = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, steps, perm, axis, dtype, training, fortran, seed


@SETTINGS
@given(views())
def test_random_strided_views(case):
    shape, steps, perm, axis, dtype, training, fortran, seed = case
    rng = np.random.default_rng(seed)
    big = rng.standard_normal([n * abs(s) for n, s in zip(shape, steps)]) * 2 + 3
    big = (np.asfortranarray(big) if fortran else big).astype(dtype)
    x = big[tuple(slice(None, None, s) for s in steps)].transpose(perm)
    c = x.shape[axis]
    assume(not training or x.size // c > 1)
    gamma, beta = rng.uniform(-2, 2, c), rng.uniform(-2, 2, c)
    rm, rv = rng.uniform(-1, 1, c), rng.uniform(0.5, 2, c)
    rm0, rv0 = rm.copy(), rv.copy()
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, _, _ = check_forward_backward(x, dy, gamma, beta, axis=axis, training=training,
                                     running=(rm, rv))
    # in place on the view itself
    y2, _ = fastbn.forward(x, gamma, beta, axis=axis, training=training,
                           running_mean=rm0.copy(), running_var=rv0.copy(), out=x)
    assert y2 is x
    assert np.array_equal(x, y)


@SETTINGS
@given(cases())
def test_backward_matches_finite_differences(case):
    """dx, dgamma and dbeta of loss = Σ w·y, against central differences of forward (float64)."""
    shape, axis, _, training, affine, seed, scale, rel_offset = case
    assume(np.prod(shape) <= 80)  # two forward calls per element
    rng, c, x = _data(shape, axis, np.float64, seed, 1.0, 0.0, training)
    x = x * 2 + rng.uniform(-3, 3)
    w = rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 2, c), rng.uniform(-1, 1, c)
    rm, rv = rng.uniform(-1, 1, c), rng.uniform(0.5, 2, c)
    running = dict(running_mean=None, running_var=None) if training else dict(
        running_mean=rm, running_var=rv)

    def loss():
        y, _ = fastbn.forward(x, gamma if affine else None, beta if affine else None, axis=axis,
                              training=training, **running)
        return float(np.sum(y * w))

    _, stats = fastbn.forward(x, gamma if affine else None, beta if affine else None, axis=axis,
                              training=training, **running)
    dx, dgamma, dbeta = fastbn.backward(w, x, stats, gamma if affine else None, axis=axis,
                                        training=training)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-6)
    if affine:
        np.testing.assert_allclose(dgamma, numeric_grad(loss, gamma), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dbeta, numeric_grad(loss, beta), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(cases())
def test_eval_forward_is_the_inference_affine_map(case):
    """forward(training=False) = scale·x + shift with (scale, shift) = inference_affine(...)."""
    shape, axis, dtype, _, affine, seed, scale, rel_offset = case
    rng, c, x = _data(shape, axis, dtype, seed, scale, rel_offset, training=False)
    gamma, beta = (rng.uniform(-2, 2, c), rng.uniform(-2, 2, c)) if affine else (None, None)
    rm = rng.uniform(-1, 1, c) * scale + rel_offset * scale
    rv = rng.uniform(0.5, 2.0, c) * scale ** 2
    y, _ = fastbn.forward(x, gamma, beta, axis=axis, training=False, running_mean=rm,
                          running_var=rv)
    a, b = fastbn.inference_affine(gamma, beta, rm, rv)
    sh = [1] * len(shape)
    sh[axis] = c
    expected = a.reshape(sh) * x.astype(np.float64) + b.reshape(sh)
    # the folded map loses |mean|/std digits (inference_affine's docstring), fastbn does not:
    # the two agree to the folded map's rounding of a·x and b
    magnitude = np.abs(a.reshape(sh) * x) + np.abs(b.reshape(sh)) + 1.0
    np.testing.assert_array_less(np.abs(y - expected), 8 * tol_for(dtype) * magnitude)


@SETTINGS
@given(cases(), st.sampled_from([None, np.float32, np.float64]))
def test_shapes_and_dtypes_through_forward_and_backward(case, param_dtype):
    shape, axis, dtype, training, _, seed, scale, rel_offset = case
    rng, c, x = _data(shape, axis, dtype, seed, scale, rel_offset, training)
    gamma = None if param_dtype is None else rng.uniform(0.5, 2, c).astype(param_dtype)
    beta = None if param_dtype is None else rng.uniform(-1, 1, c).astype(param_dtype)
    rm, rv = np.zeros(c), np.ones(c)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, training=training, running_mean=rm,
                              running_var=rv)
    assert y.shape == x.shape and y.dtype == x.dtype
    for s in stats:
        assert s.shape == (c,) and s.dtype == np.float64
    dx, dgamma, dbeta = fastbn.backward(rng.standard_normal(shape).astype(dtype), x, stats, gamma,
                                        axis=axis, training=training)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    grad_dtype = x.dtype if param_dtype is None else np.dtype(param_dtype)
    for g in (dgamma, dbeta):
        assert g.shape == (c,) and g.dtype == grad_dtype
    assert np.isfinite(y).all() and np.isfinite(dx).all()
