"""Large offsets, constant channels, and the kernels at their default block sizes."""
import numpy as np
import pytest

import fastbn

import reference
from _util import (assert_close, each_dtype, each_layout, each_mode, make_affine,
                   make_case, make_x, plain_or_affine, tol_for)
from checks import check_forward, check_forward_backward


# ---------------------------------------------------------------- large offsets

def _check_large_offset(layout, training, rng, dtype, offset, spread, **checks):
    """Data of std 1 around offset ± spread, running mean around offset: forward and backward
    against the reference (check_forward's `checks` on top).

    backward is fed the very stats fastbn returned (a float64 mean can only be as exact as its
    rounding, and x_hat depends on it at the 1e-8 level)."""
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype, offset=offset + rng.uniform(-spread, spread, c), scale=1.0)
    gamma, beta = make_affine(rng, c)
    rm = (np.full(c, offset) + rng.uniform(-1, 1, c)).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    dy = make_x(rng, shape, axis, dtype)
    check_forward_backward(x, dy, gamma, beta, axis=axis, training=training, running=(rm, rv),
                           **checks)


@each_mode
@each_layout
def test_large_offset_float64(layout, training, rng):
    """mean 1e8, std 1: E[x^2] - E[x]^2 would lose every digit; fastbn must not."""
    _check_large_offset(layout, training, rng, np.float64, 1e8, 100, mean_ulps=4)


@each_mode
@each_layout
def test_large_offset_float32(layout, training, rng):
    _check_large_offset(layout, training, rng, np.float32, 1e4, 10)


@each_dtype
@each_layout
def test_tiny_variance(layout, dtype, rng):
    """std 1e-3 around 1, with eps small enough that the variance dominates."""
    x = make_x(rng, layout.small, layout.axis, dtype, offset=1.0, scale=1e-3)
    # float32 data with std 1e-3 at 1 carries ~1e-4 relative quantization; the reference sees
    # the same quantized values, so the comparison stays at the contract's tolerance
    check_forward(x, axis=layout.axis, running=False, eps=1e-12)


# ---------------------------------------------------------------- constant channels

CONSTANTS = {np.float32: [1e7 + 1, 3.7, -0.1, 0.0], np.float64: [0.1, 1e8 + 0.5, -3.7, 0.0]}


@plain_or_affine
@each_dtype
@each_layout
def test_constant_channels_give_beta(layout, dtype, affine, rng):
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    xm = np.moveaxis(x, axis, 0)
    consts = CONSTANTS[dtype]
    const_channels = list(range(0, c, 2))
    for k, ch in enumerate(const_channels):
        xm[ch] = dtype(consts[k % len(consts)])
    if affine:
        gamma = rng.uniform(0.5, 2.0, c)
        beta = np.array([0.25, -1.5, 3.0, 0.0, -0.75, 2.5] * c)[:c]
    else:
        gamma = beta = None
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, training=True)
    ym = np.moveaxis(y, axis, 0)
    expected_beta = np.zeros(c, dtype) if beta is None else beta.astype(dtype)
    for ch in const_channels:
        assert np.all(ym[ch] == expected_beta[ch]), (ch, np.unique(ym[ch]), expected_beta[ch])
        v = float(xm[ch].flat[0])
        assert abs(stats.mean[ch] - v) <= np.spacing(abs(v)), (stats.mean[ch], v)
    # the other channels are still normalized properly
    ry, _, _, _, _ = reference.forward(x, gamma, beta, axis, True)
    assert_close(y, ry, tol_for(dtype))


@pytest.mark.parametrize("blocks", ["small", pytest.param("default", marks=pytest.mark.default_blocks)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "channels_last"])
def test_million_constant_float32_values(channels_last, blocks):
    """A float32 channel of 1e6 values equal to 1e7+1 normalizes to exactly beta
    (PyTorch 2.13 CPU returns 44.9 instead of 0 here)."""
    v = np.float32(1e7 + 1)
    assert float(v) == 1e7 + 1
    rng = np.random.default_rng(7)
    if channels_last:
        x = rng.standard_normal((1000, 1000, 2)).astype(np.float32)
        x[..., 1] = v
        axis = -1
    else:
        x = rng.standard_normal((1000, 2, 1000)).astype(np.float32)
        x[:, 1, :] = v
        axis = 1
    gamma = np.array([1.5, 2.0])
    beta = np.array([0.5, -0.25])
    y, stats = fastbn.forward(x, gamma, beta, axis=axis)
    yc = np.take(y, 1, axis=axis)
    assert np.all(yc == np.float32(-0.25)), np.unique(yc)[:10]
    assert abs(stats.mean[1] - (1e7 + 1)) <= np.spacing(1e7)
    y0, _ = fastbn.forward(x, axis=axis)
    assert np.all(np.take(y0, 1, axis=axis) == 0)
    # and the other channel against the reference
    ry, _, _, _, _ = reference.forward(x, gamma, beta, axis)
    assert_close(np.take(y, 0, axis=axis), np.take(ry, 0, axis=axis), 1e-5)


@pytest.mark.parametrize("blocks", ["small", pytest.param("default", marks=pytest.mark.default_blocks)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "channels_last"])
def test_constant_float64_point_one(channels_last, blocks):
    """0.1 is not a binary fraction: a sum/count mean is not 0.1 exactly; fastbn's must be."""
    rng = np.random.default_rng(8)
    if channels_last:
        x = rng.standard_normal((50, 40, 3))
        x[..., 2] = 0.1
        axis = -1
    else:
        x = rng.standard_normal((50, 3, 400))
        x[:, 2, :] = 0.1
        axis = 1
    y, stats = fastbn.forward(x, np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 0.3]), axis=axis)
    assert np.all(np.take(y, 2, axis=axis) == 0.3)
    assert abs(stats.mean[2] - 0.1) <= np.spacing(0.1)
    assert abs(stats.invstd[2] * np.sqrt(1e-5) - 1.0) < 1e-14
    dy = rng.standard_normal(x.shape)
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, np.array([1.0, 2.0, 3.0]), axis=axis)
    assert abs(dgamma[2]) < 1e-10
    assert_close(dbeta[2], dy.sum(axis=tuple(i for i in range(3) if i != axis % 3))[2], 1e-10)


# ---------------------------------------------------------------- default block sizes

DEFAULT_CASES = [
    ("NCHW", (4, 3, 64, 64), 1),
    ("NHWC", (80, 32, 32, 4), -1),
    ("NxD-wide", (600, 4200), 1),
    ("NCL-long", (2, 2, 70000), 1),
]


@pytest.mark.default_blocks
class TestDefaultBlockSizes:
    """Shapes larger than the default CHUNK / TILE / SEGMENT / COLUMN_BLOCK, at those sizes."""

    def test_defaults(self):
        import fastbn.cpu
        assert fastbn.cpu.CHUNK == 8192 and fastbn.cpu.TILE_ROWS == 32
        assert fastbn.cpu.SEGMENT == 1 << 20 and fastbn.cpu.COLUMN_BLOCK == 4096

    @each_dtype
    @pytest.mark.parametrize("name,shape,axis", DEFAULT_CASES, ids=[c[0] for c in DEFAULT_CASES])
    def test_forward_backward(self, name, shape, axis, dtype, rng):
        x, dy, gamma, beta, rm, rv = make_case(rng, shape, axis, dtype,
                                               offset=rng.uniform(-50, 50, shape[axis]))
        check_forward_backward(x, dy, gamma, beta, axis=axis, running=(rm, rv),
                               reference_chain=True)
        # eval, with the running statistics training left
        check_forward_backward(x, dy, gamma, beta, axis=axis, training=False, running=(rm, rv),
                               reference_chain=True)

    @pytest.mark.parametrize("name,shape,axis", DEFAULT_CASES[:2], ids=[c[0] for c in DEFAULT_CASES[:2]])
    def test_large_offset_float64(self, name, shape, axis, rng):
        c = shape[axis]
        x = make_x(rng, shape, axis, np.float64, offset=1e8 + rng.uniform(-100, 100, c), scale=1.0)
        check_forward(x, axis=axis, running=False, mean_ulps=4)


# ---------------------------------------------------------------- NaN and Inf

@pytest.mark.parametrize("bad", [np.nan, np.inf])
@each_dtype
@each_layout
def test_non_finite_value_spoils_only_its_channel(layout, dtype, bad, rng):
    """A NaN or Inf in channel 0 makes that channel's y and dx NaN; the other channels are exact."""
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    x, dy, gamma, beta, _, _ = make_case(rng, shape, axis, dtype)
    clean = x.copy()
    np.moveaxis(x, axis, 0)[0].flat[3] = bad
    y, stats = fastbn.forward(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, axis=axis)
    assert np.isnan(np.moveaxis(y, axis, 0)[0]).all()
    assert np.isnan(np.moveaxis(dx, axis, 0)[0]).all() and np.isnan(dgamma[0])
    rest = [slice(None)] * x.ndim
    rest[axis] = slice(1, None)
    rest = tuple(rest)
    ry, rmean, rinvstd, _, _ = reference.forward(clean[rest], gamma[1:], beta[1:], axis)
    rdx, rdgamma, rdbeta = reference.backward(dy[rest], clean[rest], rmean, rinvstd, gamma[1:],
                                              axis)
    tol = tol_for(dtype)
    assert_close(y[rest], ry, tol, "y")
    assert_close(dx[rest], rdx, tol, "dx")
    assert_close(dgamma[1:], rdgamma, tol, "dgamma")
    assert_close(dbeta[1:], rdbeta, tol, "dbeta")
