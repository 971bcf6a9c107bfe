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


def _all_outputs(x, dy, gamma, beta, axis):
    rm, rv = np.zeros(x.shape[axis]), np.ones(x.shape[axis])
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, axis=axis)
    return y, stats.mean, stats.invstd, rm, rv, dx, dgamma, dbeta


@each_dtype
@pytest.mark.parametrize("chunk", [16, 100, 8192], ids=["pieces", "rows", "whole"])
def test_fused_planar_gives_the_unfused_bits(chunk, dtype, monkeypatch, rng):
    """Planar training ops on big tensors run each channel in one work item (FUSE_MIN): the same
    chunks and merge order as the unfused kernels, so the same bits, and so the reference's
    values. CHUNK cuts a row in pieces, takes several rows per chunk, or the whole channel."""
    import fastbn.cpu
    channels = fastbn.cpu.FUSE_CHANNELS + 1
    shape = (5, channels, 6, 9)
    x = make_x(rng, shape, 1, dtype, offset=rng.uniform(-1e3, 1e3, channels))
    dy = make_x(rng, shape, 1, dtype)
    gamma, beta = make_affine(rng, channels)
    monkeypatch.setattr(fastbn.cpu, "CHUNK", chunk)
    monkeypatch.setattr(fastbn.cpu, "FUSE_MIN", 0)
    monkeypatch.setattr(fastbn.cpu, "PARALLEL_MIN", 0)  # only the parallel builds fuse
    assert fastbn.cpu._fuses.py_func(x.reshape(5, channels, 54), fastbn.cpu._blocks())
    slab = x.nbytes // channels
    monkeypatch.setattr(fastbn.cpu, "FUSE_SLAB", slab - 1)  # channels too big to stay in cache
    assert not fastbn.cpu._fuses.py_func(x.reshape(5, channels, 54), fastbn.cpu._blocks())
    monkeypatch.setattr(fastbn.cpu, "FUSE_SLAB", slab)
    fused = _all_outputs(x, dy, gamma, beta, 1)
    check_forward(x, gamma, beta, axis=1, rng=rng)
    mean, invstd = reference_stats(rng, x, 1, True)
    check_backward(dy, x, mean, invstd, gamma, 1, True)
    monkeypatch.setattr(fastbn.cpu, "FUSE_MIN", 10**18)
    unfused = _all_outputs(x, dy, gamma, beta, 1)
    # The serial builds (small tensors, and any tensor in a forked child) never fuse.
    monkeypatch.setattr(fastbn.cpu, "FUSE_MIN", 0)
    monkeypatch.setattr(fastbn.cpu, "PARALLEL_MIN", 10**12)
    serial = _all_outputs(x, dy, gamma, beta, 1)
    for name, a, b, c in zip(("y", "mean", "invstd", "running_mean", "running_var", "dx",
                              "dgamma", "dbeta"), fused, unfused, serial):
        assert a.tobytes() == b.tobytes() == c.tobytes(), name


def _eval_and_aliased_outputs(x, dy, gamma, beta, axis):
    """Eval forward, eval backward, and training backward into ``out=dy`` (a copy of dy) and
    into a misaligned view (its first element one element past a 64-byte line)."""
    c = x.shape[axis]
    rm, rv = np.linspace(-1, 1, c), np.linspace(0.5, 2, c)
    ye, se = fastbn.forward(x, gamma, beta, axis=axis, training=False, running_mean=rm,
                            running_var=rv)
    dxe, _, _ = fastbn.backward(dy, x, se, gamma, axis=axis, training=False)
    _, stats = fastbn.forward(x, gamma, beta, axis=axis)
    into_dy = dy.copy()
    fastbn.backward(into_dy, x, stats, gamma, axis=axis, out=into_dy)
    buffer = np.empty(x.size + 64 // x.itemsize, x.dtype)
    start = (-(buffer.ctypes.data // x.itemsize) + 1) % (64 // x.itemsize)
    shifted = buffer[start:start + x.size].reshape(x.shape)
    fastbn.forward(x, gamma, beta, axis=axis, training=False, running_mean=rm, running_var=rv,
                   out=shifted)
    return ye, dxe, into_dy, shifted


STREAMED = {"pieces": ((4, 17, 9, 23), 1, {"CHUNK": 100}),  # runs cut in pieces
            "groups": ((6, 5, 2, 19), 1, {"CHUNK": 100}),  # several runs per work item
            "fused": ((5, 17, 6, 9), 1, {"FUSE_MIN": 0}),
            "rows": ((9, 164), 1, {}),
            "rows in pieces": ((5, 300), 1, {"CHUNK": 128}),
            "channels-last rows": ((3, 4, 5, 68), -1, {}),
            "64-wide rows": ((2, 3, 7, 64), -1, {})}  # the narrowest that stream


@each_dtype
@pytest.mark.parametrize("path", list(STREAMED))
def test_streaming_stores_give_the_plain_bits(path, dtype, monkeypatch, rng):
    """Maps whose output is larger than the cache write it with streaming stores (STREAM_MIN):
    planar runs (of STREAM_RUN bytes or more) from a 64-byte boundary, with plain stores before
    and after it; rows of 64 values or more whole, when they start 16-byte aligned. The
    values are those of the plain maps, bit for bit, aligned or not, into ``dy`` itself, in every
    map (train, eval, backward of both, the fused planar ops), and so the reference's values."""
    import fastbn.cpu
    shape, axis, blocks = STREAMED[path]
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype, offset=rng.uniform(-1e3, 1e3, c))
    dy = make_x(rng, shape, axis, dtype)
    gamma, beta = make_affine(rng, c)
    shrink_blocks(monkeypatch, fastbn.cpu, dict(blocks, PARALLEL_MIN=0))
    monkeypatch.setattr(fastbn.cpu, "STREAM_MIN", 0)
    monkeypatch.setattr(fastbn.cpu, "STREAM_RUN", 0)
    x3 = np.empty(fastbn.cpu.view(x, axis % x.ndim).shape, dtype)
    blocks = fastbn.cpu._blocks()
    if x3.shape[2] < fastbn.cpu.PLANAR_RUN:  # the rows kernels
        rows = x3.reshape(x3.shape[0], -1)
        assert fastbn.cpu._streams_rows.py_func(rows, blocks)
    else:
        assert fastbn.cpu._streams.py_func(x3, blocks)
    streamed = _all_outputs(x, dy, gamma, beta, axis) + _eval_and_aliased_outputs(
        x, dy, gamma, beta, axis)
    check_forward(x, gamma, beta, axis=axis, rng=rng)
    check_forward(x, gamma, beta, axis=axis, training=False, rng=rng)
    mean, invstd = reference_stats(rng, x, axis, True)
    check_backward(dy, x, mean, invstd, gamma, axis, True)
    monkeypatch.setattr(fastbn.cpu, "STREAM_MIN", 10**18)
    plain = _all_outputs(x, dy, gamma, beta, axis) + _eval_and_aliased_outputs(
        x, dy, gamma, beta, axis)
    for name, a, b in zip(("y", "mean", "invstd", "running_mean", "running_var", "dx", "dgamma",
                           "dbeta", "eval y", "eval dx", "dx into dy", "eval y misaligned"),
                          streamed, plain):
        assert a.tobytes() == b.tobytes(), name
