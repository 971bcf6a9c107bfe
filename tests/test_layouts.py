"""Non-contiguous inputs: slices, transposes, Fortran order, negative strides."""
import numpy as np
import pytest

import fastbn

import reference
from _util import DTYPES, assert_close, make_affine, make_x, tol_for


def _views(rng, dtype):
    """(name, x, axis) for many kinds of non-contiguous arrays."""
    v = []
    a = make_x(rng, (6, 8, 7, 5), 1, dtype)
    v.append(("slice_channels", a[:, ::2], 1))
    v.append(("slice_batch", a[::2], 1))
    v.append(("slice_inner", a[:, :, 1:6, ::2], 1))
    v.append(("neg_batch", a[::-1], 1))
    v.append(("neg_channels", a[:, ::-1], 1))
    v.append(("neg_inner", a[..., ::-2], 1))
    v.append(("fortran_nchw", np.asfortranarray(a), 1))
    nhwc = make_x(rng, (4, 6, 7, 5), 3, dtype)
    v.append(("nhwc_as_nchw", nhwc.transpose(0, 3, 1, 2), 1))
    nchw = make_x(rng, (4, 5, 6, 7), 1, dtype)
    v.append(("nchw_as_nhwc", nchw.transpose(0, 2, 3, 1), -1))
    v.append(("fortran_nhwc", np.asfortranarray(nhwc), -1))
    v.append(("neg_nhwc", nhwc[:, ::-1, :, ::-1], -1))
    d = make_x(rng, (40, 9), 1, dtype)
    v.append(("nxd_T", np.ascontiguousarray(d.T).T, 1))
    v.append(("nxd_fortran", np.asfortranarray(d), 1))
    v.append(("nxd_slice", d[::3, 1:8], 1))
    v.append(("dxn_axis0", d.T, 0))
    v.append(("nxd_neg", d[::-1, ::-1], 1))
    v.append(("zero_stride", np.broadcast_to(make_x(rng, (1, 4, 6), 1, dtype), (5, 4, 6)), 1))
    return v


VIEW_NAMES = [n for n, _, _ in _views(np.random.default_rng(0), np.float64)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("which", VIEW_NAMES)
def test_non_contiguous_inputs(which, dtype, training, rng):
    name, x, axis = [v for v in _views(rng, dtype) if v[0] == which][0]
    c = x.shape[axis]
    x0 = x.copy()
    gamma, beta = make_affine(rng, c)
    rm = rng.uniform(-1, 1, c)
    rv = rng.uniform(0.5, 2, c)
    rm0, rv0 = rm.copy(), rv.copy()
    tol = tol_for(dtype)

    y, stats = fastbn.forward(x, gamma, beta, axis=axis, training=training,
                              running_mean=rm, running_var=rv)
    ry, rmean, rinvstd, rrm, rrv = reference.forward(x0, gamma, beta, axis, training, rm0, rv0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.array_equal(x, x0)
    assert_close(y, ry, tol, "y")
    assert_close(stats.mean, rmean, tol, "mean")
    assert_close(stats.invstd, rinvstd, tol, "invstd")
    if training:
        assert_close(rm, rrm, tol, "running_mean")
        assert_close(rv, rrv, tol, "running_var")

    # dy with a different non-contiguous layout from x's
    dy = np.asfortranarray(make_x(rng, x.shape, axis, dtype))[..., ::-1]
    dy0 = dy.copy()
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, axis=axis, training=training)
    rdx, rdgamma, rdbeta = reference.backward(dy0, x0, rmean, rinvstd, gamma, axis, training)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, rdx, tol, "dx")
    assert_close(dgamma, rdgamma, tol, "dgamma")
    assert_close(dbeta, rdbeta, tol, "dbeta")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_non_contiguous_running_stats_and_params(dtype, rng):
    x = make_x(rng, (5, 3, 29), 1, dtype)
    buf_m, buf_v = rng.uniform(-1, 1, 9), rng.uniform(0.5, 2, 9)
    rm, rv = buf_m[::3], buf_v[::-3]
    rm0, rv0 = rm.copy(), rv.copy()
    bm0, bv0 = buf_m.copy(), buf_v.copy()
    gbuf = rng.uniform(0.5, 2.0, (3, 2))
    gamma, beta = gbuf[:, 0], gbuf[:, 1]
    y, stats = fastbn.forward(x, gamma, beta, running_mean=rm, running_var=rv)
    ry, rmean, rinvstd, rrm, rrv = reference.forward(x, gamma, beta, 1, True, rm0, rv0)
    tol = tol_for(dtype)
    assert_close(y, ry, tol)
    assert_close(rm, rrm, tol)
    assert_close(rv, rrv, tol)
    keep = np.arange(9) % 3 != 0
    assert np.array_equal(buf_m[keep], bm0[keep]), "running_mean's neighbours were written"
    assert np.array_equal(buf_v[keep[::-1]], bv0[keep[::-1]]), "running_var's neighbours were written"
    dy = make_x(rng, x.shape, 1, dtype)
    stats2 = fastbn.BatchStats(np.repeat(stats.mean, 2)[::2], np.repeat(stats.invstd, 2)[::2])
    dx, dg, db = fastbn.backward(dy, x, stats2, gamma)
    rdx, rdg, rdb = reference.backward(dy, x, rmean, rinvstd, gamma)
    assert_close(dx, rdx, tol)
    assert_close(dg, rdg, tol)
    assert_close(db, rdb, tol)
