"""The lean path (the common CPU call, one compiled call per op) against the full path.

``fastbn.forward``/``backward`` send C-contiguous float32/float64 NumPy calls whose arguments need
no conversion down a lean path; everything else goes through the full checks and the device steps.
Both run the same compiled steps, so they must give the same bits; and the lean path must hand
every call it does not cover to the full path, which raises the errors.
"""
import numpy as np
import pytest

import fastbn
import fastbn._batchnorm as api
import reference
from _util import assert_close, each_dtype, each_layout, make_case, tol_for


@pytest.fixture
def lean_calls(monkeypatch):
    """A list that records every op the lean path runs."""
    calls = []
    for name in ("batch_norm", "batch_norm_backward"):
        original = getattr(fastbn.cpu, name)
        monkeypatch.setattr(fastbn.cpu, name,
                            lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    return calls


def _full_path_only(monkeypatch):
    monkeypatch.setattr(api, "lean_forward", lambda *args: None)
    monkeypatch.setattr(api, "lean_backward", lambda *args: None)


def _run(case, axis, param_dtype):
    """Training forward (updating copies of the running statistics), eval forward, and both
    backwards: every output, as a list of arrays."""
    x, dy, gamma, beta, rm, rv = case
    gamma, beta = gamma.astype(param_dtype), beta.astype(param_dtype)
    rm, rv = rm.astype(param_dtype), rv.astype(param_dtype)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
    y_eval, stats_eval = fastbn.forward(x, gamma, beta, axis=axis, training=False,
                                        running_mean=rm, running_var=rv)
    grads = fastbn.backward(dy, x, stats, gamma, axis=axis)
    grads_eval = fastbn.backward(dy, x, stats_eval, gamma, axis=axis, training=False)
    plain, _ = fastbn.forward(x, axis=axis)  # gamma and beta None
    plain_grads = fastbn.backward(dy, x, stats, axis=axis)
    return [y, *stats, rm, rv, y_eval, *stats_eval, *grads, *grads_eval, plain, *plain_grads]


@pytest.mark.parametrize("param_dtype", [np.float32, np.float64], ids=["params32", "params64"])
@each_dtype
@each_layout
def test_lean_path_gives_the_full_paths_bits(layout, dtype, param_dtype, rng, monkeypatch,
                                             lean_calls):
    shape, axis = layout.small, layout.axis
    case = make_case(rng, shape, axis, dtype)
    lean = _run(case, axis, param_dtype)
    assert lean_calls.count("batch_norm") == 3 and lean_calls.count("batch_norm_backward") == 3
    _full_path_only(monkeypatch)
    lean_calls.clear()
    full = _run(case, axis, param_dtype)
    assert lean_calls == []
    for k, (a, b) in enumerate(zip(lean, full)):
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert a.tobytes() == b.tobytes(), f"output {k} differs between the lean and full paths"


@each_dtype
@each_layout
def test_lean_path_against_the_reference(layout, dtype, rng, lean_calls):
    shape, axis = layout.small, layout.axis
    x, dy, gamma, beta, _, _ = make_case(rng, shape, axis, dtype, offset=1e4)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, axis=axis)
    assert lean_calls == ["batch_norm", "batch_norm_backward"]
    ry, rmean, rinvstd, _, _ = reference.forward(x, gamma, beta, axis)
    rdx, rdgamma, rdbeta = reference.backward(dy, x, rmean, rinvstd, gamma, axis)
    tol = tol_for(dtype)
    for actual, expected, name in ((y, ry, "y"), (stats.mean, rmean, "mean"),
                                   (stats.invstd, rinvstd, "invstd"), (dx, rdx, "dx"),
                                   (dgamma, rdgamma, "dgamma"), (dbeta, rdbeta, "dbeta")):
        assert_close(actual, expected, tol, name)


def _uncommon_calls(x, rm, rv):
    """Forward calls (keyword arguments) that the lean path must leave to the full checks,
    valid ones and wrong ones alike."""
    c = x.shape[1]
    return {
        "gamma a list": dict(gamma=[1.0] * c),
        "gamma float16": dict(gamma=np.ones(c, np.float16)),
        "gamma strided": dict(gamma=np.ones(2 * c)[::2]),
        "gamma of the wrong length": dict(gamma=np.ones(c + 1)),
        "eps an int": dict(eps=1),
        "eps negative": dict(eps=-1.0),
        "momentum out of range": dict(momentum=1.5, running_mean=rm, running_var=rv),
        "axis a NumPy integer": dict(axis=np.int64(1)),
        "axis out of range": dict(axis=5),
        "training not a bool": dict(training=1),
        "only running_mean": dict(running_mean=rm),
        "eval without running statistics": dict(training=False),
        "read-only running_var": dict(running_mean=rm, running_var=_read_only(rv)),
        "running_mean is running_var": dict(running_mean=rm, running_var=rm),
        "out a list": dict(out=[0.0]),
        "out read-only": dict(out=_read_only(np.empty_like(x))),
        "out strided": dict(out=np.empty((x.shape[0], 2 * c), x.dtype)[:, ::2]),
        "out overlapping x": dict(out=x[::-1]),
        "device cuda": dict(device="cuda"),
    }


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def test_uncommon_forward_calls_take_the_full_path(rng, monkeypatch, lean_calls):
    x = rng.standard_normal((6, 4))
    rm, rv = np.zeros(4), np.ones(4)
    seen = {}
    original = api.check_forward
    monkeypatch.setattr(api, "check_forward", lambda *a, **k: seen.setdefault("full", True)
                        and original(*a, **k))
    for what, options in _uncommon_calls(x, rm, rv).items():
        seen.clear()
        try:
            fastbn.forward(x, **options)
        except (TypeError, ValueError, RuntimeError):
            pass
        assert lean_calls == [] and seen == {"full": True}, what
    monkeypatch.setenv("FASTBN_DEVICE", "cpu")
    fastbn.forward(x)
    assert lean_calls == [], "FASTBN_DEVICE set: the full path reads it"


def test_uncommon_backward_calls_take_the_full_path(rng, lean_calls):
    x = rng.standard_normal((6, 4))
    y, stats = fastbn.forward(x)
    lean_calls.clear()
    for what, args, options in [
            ("stats of float32", (x, x, (stats.mean.astype(np.float32), stats.invstd)), {}),
            ("stats not a pair", (x, x, stats.mean), {}),
            ("dy of another dtype", (x.astype(np.float32), x, stats), {}),
            ("dy Fortran-ordered", (np.asfortranarray(x), x, stats), {}),
            ("out overlapping dy", (x, x.copy(), stats), dict(out=x[::-1])),
            ("a list", (x.tolist(), x, stats), {})]:
        try:
            fastbn.backward(*args, **options)
        except (TypeError, ValueError):
            pass
        assert lean_calls == [], what


def test_lean_path_in_place_and_aliased(rng, lean_calls):
    """out=x, and backward with out=dy, dy=x: the cases the full path allows, on the lean path."""
    x = rng.standard_normal((9, 5))
    expected, stats = fastbn.forward(x.copy(), axis=1)
    x_in_place = x.copy()
    y, _ = fastbn.forward(x_in_place, out=x_in_place)
    assert y is x_in_place and np.array_equal(y, expected)
    dy = rng.standard_normal(x.shape)
    dx_expected = fastbn.backward(dy, x, stats)[0]
    dy_in_place = dy.copy()
    dx = fastbn.backward(dy_in_place, x, stats, out=dy_in_place)[0]
    assert dx is dy_in_place and np.array_equal(dx, dx_expected)
    assert lean_calls == ["batch_norm"] * 2 + ["batch_norm_backward"] * 2


def test_read_only_x_as_out_is_refused(rng):
    """out=x (or dy) that is read-only: the lean path hands it to the full checks, which refuse
    it (it used to reach the compiled code, which failed to compile a store into it)."""
    x = rng.standard_normal((8, 3))
    x.flags.writeable = False
    dy = x.copy()
    dy.flags.writeable = False
    _, stats = fastbn.forward(x)
    with pytest.raises(ValueError, match="out is read-only"):
        fastbn.forward(x, out=x)
    with pytest.raises(ValueError, match="out is read-only"):
        fastbn.backward(dy, x, stats, out=dy)
    with pytest.raises(ValueError, match="out is read-only"):
        fastbn.backward(dy, x, stats, out=x)
