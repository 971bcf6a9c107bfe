"""fastbn.forward / fastbn.backward against the float64 reference: every output, its type, dtype
and shape, the running statistics, and the inputs left unchanged."""
import numpy as np

import fastbn

import reference
from _util import assert_close, make_running, tol_for


def _check_forward(x, gamma=None, beta=None, axis=1, training=True, running=True,
                   momentum=0.1, eps=1e-5, running_dtype=np.float64, rng=None, *, mean_ulps=None):
    """check_forward's work; returns (y, stats, reference mean, reference invstd)."""
    c = x.shape[axis]
    if running is True:
        rng = rng if rng is not None else np.random.default_rng(0)
        rm, rv = make_running(rng, c, running_dtype)
    elif running is False:
        rm, rv = None, None
    else:
        rm, rv = running
    x0 = x.copy()
    rm0 = None if rm is None else rm.copy()
    rv0 = None if rv is None else rv.copy()

    y, stats = fastbn.forward(x, gamma, beta, axis=axis, training=training,
                              running_mean=rm, running_var=rv, momentum=momentum, eps=eps)
    ry, rmean, rinvstd, rrm, rrv = reference.forward(x0, gamma, beta, axis, training,
                                                     rm0, rv0, momentum, eps)
    tol = tol_for(x.dtype)
    assert type(y) is np.ndarray and y.dtype == x.dtype and y.shape == x.shape
    assert isinstance(stats, fastbn.BatchStats)
    for a in stats:
        assert type(a) is np.ndarray and a.dtype == np.float64 and a.shape == (c,)
    assert np.array_equal(x, x0), "x was modified"
    assert_close(y, ry, tol, "y")
    assert_close(stats.mean, rmean, tol, "stats.mean")
    if mean_ulps is not None:
        assert np.all(np.abs(stats.mean - rmean) <= mean_ulps * np.spacing(np.abs(rmean))), \
            (stats.mean - rmean) / np.spacing(np.abs(rmean))
    assert_close(stats.invstd, rinvstd, tol, "stats.invstd")
    if rm is not None:
        assert rm.dtype == rm0.dtype and rv.dtype == rv0.dtype
        if training:
            rtol = tol_for(x.dtype, rm0.dtype, rv0.dtype)
            assert_close(rm, rrm, rtol, "running_mean")
            assert_close(rv, rrv, rtol, "running_var")
        else:
            assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes(), \
                "running stats modified in eval mode"
    return y, stats, rmean, rinvstd


def check_forward(x, gamma=None, beta=None, axis=1, training=True, running=True,
                  momentum=0.1, eps=1e-5, running_dtype=np.float64, rng=None, *, mean_ulps=None):
    """Run fastbn.forward and the reference on the same inputs; compare everything.

    running: True draws running statistics of running_dtype from rng (a fixed generator when
    rng is None), False passes none, and a pair (running_mean, running_var) passes those arrays,
    which fastbn updates in place in training.
    mean_ulps: also require stats.mean within that many ulps of the reference's mean.
    Returns (y, stats).
    """
    y, stats, _, _ = _check_forward(x, gamma, beta, axis, training, running, momentum, eps,
                                    running_dtype, rng, mean_ulps=mean_ulps)
    return y, stats


def check_backward(dy, x, mean, invstd, gamma=None, axis=1, training=True, stats=None):
    """Run fastbn.backward and the reference on the same inputs; compare everything.

    The reference gets the statistics (mean, invstd); fastbn gets `stats` when given (e.g. the
    BatchStats fastbn.forward returned), else mean and invstd as float64 arrays.
    Returns (dx, dgamma, dbeta).
    """
    c = x.shape[axis]
    dy0, x0 = dy.copy(), x.copy()
    if stats is None:
        stats = fastbn.BatchStats(np.array(mean, dtype=np.float64),
                                  np.array(invstd, dtype=np.float64))
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, axis=axis, training=training)
    rdx, rdgamma, rdbeta = reference.backward(dy0, x0, mean, invstd, gamma, axis, training)
    pdtype = x.dtype if gamma is None else np.asarray(gamma).dtype
    assert type(dx) is np.ndarray and dx.dtype == x.dtype and dx.shape == x.shape
    for g in (dgamma, dbeta):
        assert type(g) is np.ndarray and g.shape == (c,) and g.dtype == pdtype
    assert np.array_equal(dy, dy0) and np.array_equal(x, x0), "inputs modified"
    tol = tol_for(x.dtype)
    assert_close(dx, rdx, tol, "dx")
    assert_close(dgamma, rdgamma, tol_for(x.dtype, pdtype), "dgamma")
    assert_close(dbeta, rdbeta, tol_for(x.dtype, pdtype), "dbeta")
    return dx, dgamma, dbeta


def check_forward_backward(x, dy, gamma=None, beta=None, axis=1, training=True, *,
                           reference_chain=False, **forward_options):
    """check_forward, then check_backward with the statistics fastbn.forward returned.

    reference_chain: give the reference's backward the reference's own forward statistics, so
    that fastbn's forward -> backward chain is compared with the reference's chain; otherwise
    both backwards get fastbn's statistics.
    forward_options: check_forward's other options (running, momentum, eps, rng, mean_ulps...).
    Returns (y, stats, (dx, dgamma, dbeta)).
    """
    y, stats, rmean, rinvstd = _check_forward(x, gamma, beta, axis, training, **forward_options)
    if reference_chain:
        grads = check_backward(dy, x, rmean, rinvstd, gamma, axis, training, stats=stats)
    else:
        grads = check_backward(dy, x, stats.mean, stats.invstd, gamma, axis, training)
    return y, stats, grads


def reference_stats(rng, x, axis=1, training=True):
    """The reference's (mean, invstd) of x, to feed check_backward: the batch's in training, those
    of running statistics drawn from rng in eval."""
    rm, rv = make_running(rng, x.shape[axis])
    _, mean, invstd, _, _ = reference.forward(x, None, None, axis, training, rm, rv)
    return mean, invstd
