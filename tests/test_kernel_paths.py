"""Both kernel families on every layout: planar (long contiguous runs per channel) and rows.

fastbn.cpu sends a view (outer, C, inner) to the planar kernels when inner >= PLANAR_RUN and reads
it as rows of C·inner values otherwise (channels-last, and short runs such as N×C×4). Forcing each
family in turn runs both on every layout, at the tests' small block sizes.
"""
import numpy as np
import pytest

import fastbn

import reference
from _util import (assert_close, each_dtype, each_layout, each_mode, make_affine, make_x,
                   shrink_blocks, tol_for)
from checks import check_backward, check_forward, reference_stats

PATHS = {"planar": 1, "rows": 10**9}


@pytest.fixture(params=list(PATHS))
def kernel_path(request, monkeypatch):
    import fastbn.cpu
    monkeypatch.setattr(fastbn.cpu, "PLANAR_RUN", PATHS[request.param])
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



@pytest.mark.default_blocks
@pytest.mark.parametrize("blocks", [{}, {"TILE_ROWS": 9, "COLUMN_BLOCK": 70, "CHUNK": 300}],
                         ids=["default", "tile9"])
@each_mode
@each_dtype
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 37, 70, 300])
@pytest.mark.parametrize("width", [64, 65, 130])
def test_rows_sweeps(rows, width, dtype, training, blocks, monkeypatch, rng):
    """The rows kernels read four rows per sweep (moments, gradient sums; the float32 map of rows
    wider than 64), then the rows left over one at a time: every remainder, with tiles that end
    mid-sweep, column blocks on both sides of the width rule. (The suite's small blocks are too
    small for sweeps: this test sets its own.)"""
    import fastbn.cpu
    shrink_blocks(monkeypatch, fastbn.cpu, dict(blocks, PARALLEL_MIN=0))
    x = make_x(rng, (rows, width), 1, dtype)
    gamma, beta = make_affine(rng, width)
    if training and rows < 2:
        x = np.concatenate([x, x[:1] + 1])
    check_forward(x, gamma, beta, axis=1, training=training, rng=rng)
    dy = make_x(rng, x.shape, 1, dtype)
    mean, invstd = reference_stats(rng, x, 1, training)
    check_backward(dy, x, mean, invstd, gamma, 1, training)
