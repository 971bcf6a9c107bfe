"""Non-contiguous inputs: slices, transposes, Fortran order, negative strides."""
import numpy as np
import pytest

import fastbn

import reference
from _util import each_dtype, each_mode, make_affine, make_x
from checks import check_backward, check_forward, check_forward_backward


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


@each_mode
@each_dtype
@pytest.mark.parametrize("which", VIEW_NAMES)
def test_non_contiguous_inputs(which, dtype, training, rng):
    name, x, axis = [v for v in _views(rng, dtype) if v[0] == which][0]
    c = x.shape[axis]
    gamma, beta = make_affine(rng, c)
    rm = rng.uniform(-1, 1, c)
    rv = rng.uniform(0.5, 2, c)
    # dy with a different non-contiguous layout from x's
    dy = np.asfortranarray(make_x(rng, x.shape, axis, dtype))[..., ::-1]
    check_forward_backward(x, dy, gamma, beta, axis=axis, training=training, running=(rm, rv),
                           reference_chain=True)


@each_dtype
def test_non_contiguous_running_stats_and_params(dtype, rng):
    x = make_x(rng, (5, 3, 29), 1, dtype)
    buf_m, buf_v = rng.uniform(-1, 1, 9), rng.uniform(0.5, 2, 9)
    rm, rv = buf_m[::3], buf_v[::-3]
    bm0, bv0 = buf_m.copy(), buf_v.copy()
    gbuf = rng.uniform(0.5, 2.0, (3, 2))
    gamma, beta = gbuf[:, 0], gbuf[:, 1]
    _, stats = check_forward(x, gamma, beta, running=(rm, rv))
    keep = np.arange(9) % 3 != 0
    assert np.array_equal(buf_m[keep], bm0[keep]), "running_mean's neighbours were written"
    assert np.array_equal(buf_v[keep[::-1]], bv0[keep[::-1]]), "running_var's neighbours were written"
    dy = make_x(rng, x.shape, 1, dtype)
    # fastbn gets non-contiguous statistics; the reference, its own
    stats2 = fastbn.BatchStats(np.repeat(stats.mean, 2)[::2], np.repeat(stats.invstd, 2)[::2])
    _, rmean, rinvstd, _, _ = reference.forward(x, gamma, beta)
    check_backward(dy, x, rmean, rinvstd, gamma, stats=stats2)
