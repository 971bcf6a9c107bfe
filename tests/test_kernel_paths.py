"""Every kernel path on every layout: planar, planar fused, and rows.

fastbn.cpu sends a view (outer, C, inner) to the planar kernels when inner >= PLANAR_RUN and reads
it as rows of C·inner values otherwise (channels-last, and short runs such as N×C×4). Planar
training forward and backward take a channel per work item ("fused": reduce, then map while the
channel's slab is in cache) when there are enough channels and a slab fits in FUSED_SLAB bytes.
Forcing each path in turn runs all three on every layout, at the tests' small block sizes.
"""
import numpy as np
import pytest

import fastbn

import reference
from _util import assert_close, each_dtype, each_layout, each_mode, make_affine, make_x, tol_for
from checks import check_backward, check_forward, reference_stats

PATHS = {
    "planar": {"PLANAR_RUN": 1, "FUSED_SLAB": 0},
    "fused": {"PLANAR_RUN": 1, "FUSED_SLAB": 1 << 40, "MIN_WORK_ITEMS": 1},
    "rows": {"PLANAR_RUN": 10**9},
}


def _force(monkeypatch, path):
    import fastbn.cpu
    for name, value in PATHS[path].items():
        monkeypatch.setattr(fastbn.cpu, name, value)


@pytest.fixture(params=list(PATHS))
def kernel_path(request, monkeypatch):
    _force(monkeypatch, request.param)
    return request.param


@each_mode
@each_dtype
@each_layout
def test_forward_and_backward(kernel_path, layout, dtype, training, rng):
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    gamma, beta = make_affine(rng, c)
    check_forward(x, gamma, beta, axis=axis, training=training, rng=rng)
    dy = make_x(rng, shape, axis, dtype)
    mean, invstd = reference_stats(rng, x, axis, training)
    check_backward(dy, x, mean, invstd, gamma, axis, training)


@each_layout
def test_large_offset_and_constant_channel(kernel_path, layout, rng):
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    x = make_x(rng, shape, axis, np.float64, offset=rng.uniform(-1e8, 1e8, c), scale=1.0)
    np.moveaxis(x, axis, 0)[0] = 0.1  # channel 0 constant
    gamma, beta = make_affine(rng, c)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis)
    ry, rmean, rinvstd, _, _ = reference.forward(x, gamma, beta, axis)
    assert_close(y, ry, tol_for(np.float64), "y")
    assert_close(stats.invstd[1:], rinvstd[1:], tol_for(np.float64), "invstd")
    assert np.all(np.moveaxis(y, axis, 0)[0] == beta[0]), "constant channel must give beta"


@each_dtype
@each_layout
def test_fused_and_two_step_planar_give_the_same_bits(layout, dtype, rng, monkeypatch):
    """The fused kernels cut a channel into the same chunks and merge them in the same order."""
    shape, axis = layout.small, layout.axis
    x, dy = make_x(rng, shape, axis, dtype), make_x(rng, shape, axis, dtype)
    gamma, beta = make_affine(rng, shape[axis])
    results = {}
    for path in ("planar", "fused"):
        _force(monkeypatch, path)
        y, stats = fastbn.forward(x, gamma, beta, axis=axis)
        results[path] = [y, *stats, *fastbn.backward(dy, x, stats, gamma, axis=axis)]
    for a, b in zip(results["planar"], results["fused"]):
        assert a.tobytes() == b.tobytes()
