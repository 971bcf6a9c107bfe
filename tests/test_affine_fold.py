"""inference_affine and fold: eval-mode BN as one multiply-add, and folded into Linear / Conv."""
import numpy as np
import pytest

import fastbn

from _util import (Snapshot, assert_close, bcast, each_dtype, each_layout, make_affine,
                   make_running, make_x, tol_for)


@each_dtype
@each_layout
def test_inference_affine_matches_eval_forward(layout, dtype, rng):
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    gamma, beta = make_affine(rng, c)
    rm, rv = make_running(rng, c)
    snap = Snapshot(gamma=gamma, beta=beta, rm=rm, rv=rv)
    scale, shift = fastbn.inference_affine(gamma, beta, rm, rv, eps=1e-3)
    snap.assert_unchanged()
    assert np.shape(scale) == (c,) and np.shape(shift) == (c,)
    # the seeds' inference formula
    exp_scale = gamma / np.sqrt(rv + 1e-3)
    exp_shift = beta - gamma * rm / np.sqrt(rv + 1e-3)
    assert_close(scale, exp_scale, 1e-12)
    assert_close(shift, exp_shift, 1e-12)
    y, _ = fastbn.forward(x, gamma, beta, axis=axis, training=False, running_mean=rm,
                          running_var=rv, eps=1e-3)
    folded = bcast(scale, x.ndim, axis) * x.astype(np.float64) + bcast(shift, x.ndim, axis)
    assert_close(y, folded, tol_for(dtype))


def test_inference_affine_default_eps_and_float32_stats(rng):
    gamma, beta = make_affine(rng, 5, np.float32)
    rm, rv = make_running(rng, 5, np.float32)
    scale, shift = fastbn.inference_affine(gamma, beta, rm, rv)
    g, b, m, v = (a.astype(np.float64) for a in (gamma, beta, rm, rv))
    assert_close(scale, g / np.sqrt(v + 1e-5), 1e-6)
    assert_close(shift, b - g * m / np.sqrt(v + 1e-5), 1e-6)


def _bn_eval(z, gamma, beta, rm, rv, eps):
    y, _ = fastbn.forward(z, gamma, beta, axis=1, training=False, running_mean=rm,
                          running_var=rv, eps=eps)
    return y


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_fold_linear(with_bias, rng):
    n, fin, fout = 20, 7, 5
    x = rng.standard_normal((n, fin))
    w = rng.standard_normal((fout, fin))
    b = rng.standard_normal(fout) if with_bias else None
    gamma, beta = make_affine(rng, fout)
    rm, rv = make_running(rng, fout)
    eps = 1e-3
    snap = Snapshot(w=w, b=b, gamma=gamma, beta=beta, rm=rm, rv=rv)
    w2, b2 = fastbn.fold(w, b, gamma, beta, rm, rv, eps=eps)
    snap.assert_unchanged()
    assert np.shape(w2) == w.shape and np.shape(b2) == (fout,)

    z = x @ w.T + (0.0 if b is None else b)
    expected = _bn_eval(z, gamma, beta, rm, rv, eps)
    got = x @ np.asarray(w2).T + b2
    assert_close(got, expected, 1e-10)


def _conv2d(x, w, b=None):
    """Direct 'valid' convolution (cross-correlation, as in PyTorch): x (N,Cin,H,W),
    w (Cout,Cin,kh,kw) -> (N,Cout,H-kh+1,W-kw+1)."""
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # N,Cin,Ho,Wo,kh,kw
    y = np.einsum("nchwij,ocij->nohw", win, w)
    if b is not None:
        y = y + b[None, :, None, None]
    return y


def test_conv2d_helper_is_a_convolution(rng):
    x = rng.standard_normal((1, 2, 4, 5))
    w = rng.standard_normal((3, 2, 2, 3))
    y = _conv2d(x, w)
    o, i, j = 2, 1, 2
    assert np.isclose(y[0, o, i, j], np.sum(x[0, :, i:i + 2, j:j + 3] * w[o]))


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_fold_conv2d(with_bias, rng):
    x = rng.standard_normal((3, 4, 9, 8))
    w = rng.standard_normal((6, 4, 3, 2))
    b = rng.standard_normal(6) if with_bias else None
    gamma, beta = make_affine(rng, 6)
    rm, rv = make_running(rng, 6)
    snap = Snapshot(w=w, b=b, gamma=gamma, beta=beta, rm=rm, rv=rv)
    w2, b2 = fastbn.fold(w, b, gamma, beta, rm, rv)  # default eps
    snap.assert_unchanged()
    assert np.shape(w2) == w.shape and np.shape(b2) == (6,)
    expected = _bn_eval(_conv2d(x, w, b), gamma, beta, rm, rv, 1e-5)
    got = _conv2d(x, np.asarray(w2), np.asarray(b2))
    assert_close(got, expected, 1e-10)


def test_fold_float32_layer(rng):
    x = rng.standard_normal((10, 6)).astype(np.float32)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    gamma, beta = make_affine(rng, 4, np.float32)
    rm, rv = make_running(rng, 4, np.float32)
    w2, b2 = fastbn.fold(w, b, gamma, beta, rm, rv)
    z = (x.astype(np.float64) @ w.T.astype(np.float64) + b).astype(np.float32)
    expected = _bn_eval(z, gamma, beta, rm, rv, 1e-5)
    got = x.astype(np.float64) @ np.asarray(w2, np.float64).T + np.asarray(b2, np.float64)
    assert_close(got, expected, 1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inference_affine_keeps_the_parameters_dtype(dtype, rng):
    c = 4
    gamma, beta = rng.uniform(0.5, 2, c).astype(dtype), rng.normal(size=c).astype(dtype)
    rm, rv = rng.normal(size=c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    scale, shift = fastbn.inference_affine(gamma, beta, rm, rv)
    assert scale.dtype == dtype and shift.dtype == dtype
    w, b = fastbn.fold(np.ones((c, 3), dtype), None, gamma, beta, rm, rv)
    assert w.dtype == dtype and b.dtype == dtype
