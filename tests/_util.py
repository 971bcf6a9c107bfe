"""Small helpers shared by the tests: tolerances, parametrizations, data generators, argument
snapshots."""
import numpy as np
import pytest

from fastbn.cases import LAYOUTS

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}
DTYPES = (np.float32, np.float64)
LAYOUT_IDS = [lay.name for lay in LAYOUTS]

# The parametrizations most tests share, with the same argument names and ids everywhere.
each_layout = pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
each_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
each_mode = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
plain_or_affine = pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])


def tol_for(*dtypes):
    """The contract's tolerance: 1e-5 if any of the dtypes is float32, else 1e-10."""
    return max(TOL[np.dtype(d)] for d in dtypes if d is not None)


def assert_close(actual, expected, tol, err_msg=""):
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol * scale,
                               err_msg=err_msg)


def bcast(v, ndim, axis):
    """Reshape a (C,) vector so that it broadcasts along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


def make_x(rng, shape, axis=1, dtype=np.float64, offset=None, scale=None):
    """Random data whose channels have different means and spreads."""
    c = shape[axis]
    if offset is None:
        offset = rng.uniform(-3, 3, c)
    if scale is None:
        scale = rng.uniform(0.5, 2.0, c)
    offset = np.broadcast_to(np.asarray(offset, dtype=np.float64), (c,))
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (c,))
    x = rng.standard_normal(shape) * bcast(scale, len(shape), axis) + bcast(offset, len(shape), axis)
    return x.astype(dtype)


def make_affine(rng, c, dtype=np.float64):
    gamma = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
    beta = rng.uniform(-1.0, 1.0, c).astype(dtype)
    return gamma, beta


def make_running(rng, c, dtype=np.float64):
    rm = rng.uniform(-1.0, 1.0, c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    return rm, rv


def make_case(rng, shape, axis, dtype=np.float64, **x_options):
    """x, dy, gamma, beta, running_mean, running_var for one shape, drawn in that order
    (x_options go to make_x for x)."""
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype, **x_options)
    dy = make_x(rng, shape, axis, dtype)
    gamma, beta = make_affine(rng, c)
    rm, rv = make_running(rng, c)
    return x, dy, gamma, beta, rm, rv


class Snapshot:
    """Bitwise copies of arrays, to check that a call left them untouched."""

    def __init__(self, **arrays):
        self.saved = {k: (v, None if v is None else np.array(v, copy=True))
                      for k, v in arrays.items() if isinstance(v, np.ndarray) or v is None}

    def assert_unchanged(self):
        for name, (live, copy) in self.saved.items():
            if live is None:
                continue
            assert live.dtype == copy.dtype and live.shape == copy.shape, name
            assert live.tobytes() == copy.tobytes(), f"{name} was modified"


def numeric_grad(f, a, h=1e-6):
    """Central finite differences of the scalar ``f()`` with respect to ``a``, perturbed in place."""
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + h
        fp = f()
        a[i] = old - h
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g
