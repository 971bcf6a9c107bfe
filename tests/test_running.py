"""Running statistics accumulated over several training steps, against the reference."""
import numpy as np
import pytest

import fastbn

import reference
from _util import assert_close, each_layout, make_x, tol_for


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dtype,rdtype", [(np.float64, np.float64), (np.float32, np.float32),
                                          (np.float64, np.float32), (np.float32, np.float64)],
                         ids=["x64-run64", "x32-run32", "x64-run32", "x32-run64"])
@each_layout
def test_running_stats_over_steps(layout, dtype, rdtype, momentum, rng):
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    rm = np.zeros(c, dtype=rdtype)
    rv = np.ones(c, dtype=rdtype)
    ref_rm, ref_rv = rm.astype(np.float64), rv.astype(np.float64)
    tol = tol_for(dtype, rdtype)
    for step in range(5):
        x = make_x(rng, shape, axis, dtype, offset=rng.uniform(-5, 5, c) * (step + 1),
                   scale=rng.uniform(0.2, 3.0, c))
        ident = (id(rm), id(rv))
        y, stats = fastbn.forward(x, axis=axis, training=True, running_mean=rm, running_var=rv,
                                  momentum=momentum)
        assert (id(rm), id(rv)) == ident and rm.dtype == rdtype and rv.dtype == rdtype
        ry, rmean, rinvstd, ref_rm, ref_rv = reference.forward(
            x, None, None, axis, True, ref_rm, ref_rv, momentum, 1e-5)
        # the stored values are rounded to the running statistics' dtype after each step
        ref_rm, ref_rv = ref_rm.astype(rdtype).astype(np.float64), ref_rv.astype(rdtype).astype(np.float64)
        assert_close(rm, ref_rm, tol, f"running_mean step {step}")
        assert_close(rv, ref_rv, tol, f"running_var step {step}")
        assert_close(y, ry, tol_for(dtype), f"y step {step}")
        assert_close(stats.mean, rmean, tol_for(dtype), f"mean step {step}")
    if momentum == 0.0:
        assert np.array_equal(rm, np.zeros(c)) and np.array_equal(rv, np.ones(c))
    if momentum == 1.0:
        # the last batch's statistics, unbiased variance
        m = x.size // c
        assert_close(rm, stats.mean, tol)
        assert_close(rv, (1.0 / stats.invstd ** 2 - 1e-5) * m / (m - 1), tol)


def test_unbiased_variance_in_running_var():
    """Two values per channel: biased var = d^2/4, unbiased = d^2/2 (m/(m-1) = 2)."""
    x = np.array([[1.0, 10.0], [3.0, 4.0]])
    rm, rv = np.zeros(2), np.zeros(2)
    _, stats = fastbn.forward(x, training=True, running_mean=rm, running_var=rv, momentum=1.0,
                              eps=1e-5)
    np.testing.assert_allclose(rm, [2.0, 7.0], rtol=1e-15)
    np.testing.assert_allclose(rv, [2.0, 18.0], rtol=1e-15)
    np.testing.assert_allclose(stats.invstd, 1 / np.sqrt(np.array([1.0, 9.0]) + 1e-5), rtol=1e-15)
