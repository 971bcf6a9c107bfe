"""hypothesis: random shapes, axes, dtypes, offsets and scales, against the reference."""
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastbn

import reference
from _util import assert_close, tol_for
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
