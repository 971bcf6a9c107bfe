"""Tensors of more than 2**31 elements (8.6 GB in float32): every index computed in 64 bits.

x repeats a pattern of P values along each channel, so that the exact statistics and outputs
are known from one period, in float64, without a reference copy of the tensor. Forward runs in
place (out=x) and backward into dy, so the test needs one tensor's memory (two for backward),
and skips itself when the machine does not have it.
"""
import numpy as np
import pytest

import fastbn

P = 1024
ELEMENTS = 2**31 + 2**21
SHAPES = {"planar (1, 2, L)": ((1, 2, ELEMENTS // 2), 1),
          "rows (N, 4)": ((ELEMENTS // 4, 4), 1)}
pattern_x = ((np.arange(P) * 37) % 101 - 50).astype(np.float64)
pattern_dy = ((np.arange(P) * 53) % 89 - 30).astype(np.float64) / 8


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _fill(shape, axis, pattern, channel_offset):
    """float32 array: channel c holds ``pattern[k % P] + channel_offset·c`` at its k-th value."""
    a = np.empty(shape, np.float32)
    if axis == 1 and len(shape) == 3:  # (1, C, L): along each run
        for c in range(shape[1]):
            a[0, c].reshape(-1, P)[:] = pattern + channel_offset * c
    else:  # (N, D): down each column
        a.reshape(-1, P, shape[1])[:] = (pattern[:, None] + channel_offset * np.arange(shape[1]))
    return a


def _samples(a, axis):
    """Values of every channel at positions k (with k % P known): the first and last periods,
    the period around element 2**31, and every 7919th period in between."""
    channels = np.moveaxis(a, axis, 0)
    channels = channels.reshape(channels.shape[0], -1)
    length = channels.shape[1]
    starts = sorted({0, length - P, (2**31 // channels.shape[0]) // P * P,
                     *range(0, length - P, 7919 * P)})
    return np.stack([channels[:, s:s + P] for s in starts], axis=1)  # (C, periods, P)


def _skip_unless(needed):
    if _available_bytes() < needed * 1.2:
        pytest.skip(f"needs {needed * 1.2 / 1e9:.1f} GB of available memory")


@pytest.mark.default_blocks
@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_past_2_31_elements(name):
    shape, axis = SHAPES[name]
    _skip_unless(ELEMENTS * 4)
    c = shape[axis]
    x = _fill(shape, axis, pattern_x, 10.0)
    gamma, beta = np.linspace(0.5, 2.0, c), np.linspace(-1.0, 1.0, c)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, out=x)
    assert y is x
    mean = pattern_x.mean() + 10.0 * np.arange(c)
    invstd = 1.0 / np.sqrt(pattern_x.var() + 1e-5)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.invstd, invstd, rtol=1e-12)
    expected = (pattern_x - pattern_x.mean()) * invstd * gamma[:, None] + beta[:, None]
    got = _samples(y, axis)
    np.testing.assert_allclose(got, np.broadcast_to(expected[:, None, :], got.shape),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.default_blocks
@pytest.mark.parametrize("name", list(SHAPES))
def test_backward_past_2_31_elements(name):
    shape, axis = SHAPES[name]
    _skip_unless(2 * ELEMENTS * 4)
    c = shape[axis]
    x = _fill(shape, axis, pattern_x, 10.0)
    dy = _fill(shape, axis, pattern_dy, 0.0)
    gamma = np.linspace(0.5, 2.0, c)
    mean = pattern_x.mean() + 10.0 * np.arange(c)
    invstd = np.full(c, 1.0 / np.sqrt(pattern_x.var() + 1e-5))
    dx, dgamma, dbeta = fastbn.backward(dy, x, fastbn.BatchStats(mean, invstd), gamma,
                                        axis=axis, out=dy)
    del x
    assert dx is dy
    xhat = (pattern_x - pattern_x.mean()) * invstd[0]
    periods = ELEMENTS // c // P
    np.testing.assert_allclose(dbeta, np.full(c, pattern_dy.sum() * periods), rtol=1e-12)
    np.testing.assert_allclose(dgamma, np.full(c, (pattern_dy * xhat).sum() * periods),
                               rtol=1e-9, atol=1e-6)
    expected = gamma[:, None] * invstd[0] * (
        pattern_dy - pattern_dy.mean() - xhat * (pattern_dy * xhat).mean())
    got = _samples(dx, axis)
    np.testing.assert_allclose(got, np.broadcast_to(expected[:, None, :], got.shape),
                               rtol=1e-5, atol=1e-5)
