"""Batch norm fused with a residual add and ReLU: ``y = relu(BN(x) + residual)`` and its backward.

The yardsticks: the float64 reference (tests/reference.py) with the add and the ReLU done in
NumPy; plain fastbn on the same data (the statistics, and the pre-activation, are plain BN's
bits, so ReLU alone gives exactly ``np.maximum(plain_y, 0)``, and the fused backward is plain
backward of the masked dy); finite differences away from the kink; PyTorch where installed.
"""
import numpy as np
import pytest
import reference
from _util import (
    Snapshot,
    assert_close,
    each_dtype,
    each_layout,
    each_mode,
    make_case,
    make_x,
    numeric_grad,
    shrink_blocks,
    tol_for,
)

import fastbn

FUSIONS = {"residual": (True, None), "relu": (False, "relu"), "residual+relu": (True, "relu")}
each_fusion = pytest.mark.parametrize("fusion", list(FUSIONS))


def reference_fused(x, residual, activation, gamma, beta, axis, training, rm=None, rv=None):
    """The float64 reference's y of the fused op, its (mean, invstd), and the pre-activation."""
    ry, mean, invstd, _, _ = reference.forward(x, gamma, beta, axis, training, rm, rv)
    pre = ry + (0.0 if residual is None else residual.astype(np.float64))
    return (np.maximum(pre, 0.0) if activation else pre), mean, invstd


def assert_rounded_once(y, expected, what):
    """``y`` is ``expected`` (float64) rounded once to y's dtype: within one unit in the last
    place (float64 ties and the reference's own rounding allow that), and exact at zeros."""
    expected_rounded = expected.astype(y.dtype)
    ulp = np.spacing(np.abs(expected_rounded)).astype(np.float64)
    assert np.all(np.abs(y.astype(np.float64) - expected) <= ulp), what


def fused_case(rng, layout, dtype, fusion):
    shape, axis = layout.small, layout.axis
    x, dy, gamma, beta, rm, rv = make_case(rng, shape, axis, dtype)
    with_residual, activation = FUSIONS[fusion]
    residual = make_x(rng, shape, axis, dtype, offset=0.0, scale=1.0) if with_residual else None
    return x, dy, residual, activation, gamma, beta, rm, rv, axis


@each_fusion
@each_mode
@each_dtype
@each_layout
def test_forward_against_reference_and_plain(kernel_path, layout, dtype, training, fusion, rng):
    x, _dy, residual, activation, gamma, beta, rm, rv, axis = fused_case(rng, layout, dtype,
                                                                        fusion)
    running = dict(running_mean=rm.copy(), running_var=rv.copy())
    plain_running = dict(running_mean=rm.copy(), running_var=rv.copy())
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, training=training, residual=residual,
                              activation=activation, **running)
    plain_y, plain_stats = fastbn.forward(x, gamma, beta, axis=axis, training=training,
                                          **plain_running)
    # The statistics and running statistics are plain batch norm's, bit for bit.
    for name in ("mean", "invstd"):
        assert getattr(stats, name).tobytes() == getattr(plain_stats, name).tobytes(), name
    for name in running:
        assert running[name].tobytes() == plain_running[name].tobytes(), name
    expected, _, _ = reference_fused(x, residual, activation, gamma, beta, axis, training, rm, rv)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, expected, tol_for(dtype), "y")
    if residual is None:  # ReLU alone: the plain y, clamped
        assert y.tobytes() == np.maximum(plain_y, 0).tobytes()
    if activation:
        assert np.all(y >= 0)


@each_fusion
@each_mode
@each_dtype
@each_layout
def test_backward_against_reference_and_plain(kernel_path, layout, dtype, training, fusion, rng):
    x, dy, residual, activation, gamma, beta, rm, rv, axis = fused_case(rng, layout, dtype,
                                                                        fusion)
    running = dict(running_mean=rm, running_var=rv)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, training=training, residual=residual,
                              activation=activation, **running)
    dresidual = np.full_like(dy, np.nan)
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, axis=axis, training=training,
                                        activation=activation, y=y if activation else None,
                                        dresidual=dresidual)
    gated = np.where(y > 0, dy, 0).astype(dtype) if activation else dy
    assert dresidual.tobytes() == gated.tobytes(), "dresidual is dy·[y > 0]"
    # The fused backward is plain backward of the gated dy, bit for bit ...
    plain = fastbn.backward(gated, x, stats, gamma, axis=axis, training=training)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), plain):
        assert got.tobytes() == want.tobytes(), name
    # ... and the reference's.
    rdx, rdgamma, rdbeta = reference.backward(gated, x, stats.mean, stats.invstd, gamma, axis,
                                              training)
    tol = tol_for(dtype)
    assert_close(dx, rdx, tol, "dx")
    assert_close(dgamma, rdgamma, tol, "dgamma")
    assert_close(dbeta, rdbeta, tol, "dbeta")


@each_dtype
@pytest.mark.parametrize("layout_name", ["NCHW", "NHWC", "NxD"])
def test_the_sum_and_relu_are_rounded_once(layout_name, dtype, rng):
    """The pre-activation is plain BN's float64 value; the residual is added to it in float64
    and the result is rounded once: y is the float64 reference, rounded (to within the
    reference's own last bit)."""
    from fastbn.cases import LAYOUTS
    layout = next(lay for lay in LAYOUTS if lay.name == layout_name)
    x, _, residual, activation, gamma, beta, _, _, axis = fused_case(rng, layout, dtype,
                                                                     "residual+relu")
    residual *= 3.0  # about as large as BN's output: many results cross zero
    y, _ = fastbn.forward(x, gamma, beta, axis=axis, residual=residual, activation=activation)
    expected, _, _ = reference_fused(x, residual, activation, gamma, beta, axis, True)
    if dtype == np.float32:
        assert_rounded_once(y, expected, "y")
    else:
        assert_close(y, expected, 1e-13, "y")
    assert np.count_nonzero(y == 0) > 0 and np.count_nonzero(y > 0) > 0


@pytest.mark.default_blocks
@each_dtype
@pytest.mark.parametrize("path", ["plain", "streamed", "fused-planar", "rows", "streamed-rows"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_cpu_path(path, dtype, training, monkeypatch, rng):
    """Each map and sums path of fastbn.cpu, forced: the fused results are the plain results of
    the same path with the residual and mask applied (bitwise where they must be)."""
    import fastbn.cpu
    blocks = {"PARALLEL_MIN": 0}
    channels = fastbn.cpu.FUSE_CHANNELS + 1
    shape, axis = (4, channels, 8, 16), 1  # runs of 128 values, planar
    if path == "streamed":
        blocks.update(STREAM_MIN=0, STREAM_RUN=0)
    elif path == "fused-planar":
        blocks.update(FUSE_MIN=0, STREAM_MIN=0, STREAM_RUN=0)
    elif path == "rows":  # float32 rows wider than 64 are mapped four at a time
        shape, axis = (39, 130), 1
    elif path == "streamed-rows":
        blocks.update(STREAM_MIN=0)
        shape, axis = (40, 64), 1
    shrink_blocks(monkeypatch, fastbn.cpu, blocks)
    x, dy, gamma, beta, rm, rv = make_case(rng, shape, axis, dtype)
    residual = make_x(rng, shape, axis, dtype, offset=0.0, scale=1.0)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, training=training, running_mean=rm,
                              running_var=rv, residual=residual, activation="relu")
    expected, _, _ = reference_fused(x, residual, "relu", gamma, beta, axis, training, rm, rv)
    assert_close(y, expected, tol_for(dtype), "y")
    relu_only, _ = fastbn.forward(x, gamma, beta, axis=axis, training=training, running_mean=rm,
                                  running_var=rv, activation="relu")
    plain_y, _ = fastbn.forward(x, gamma, beta, axis=axis, training=training, running_mean=rm,
                                running_var=rv)
    assert relu_only.tobytes() == np.maximum(plain_y, 0).tobytes()
    dresidual = np.empty_like(dy)
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, axis=axis, training=training,
                                        activation="relu", y=y, dresidual=dresidual)
    gated = np.where(y > 0, dy, 0).astype(dtype)
    assert dresidual.tobytes() == gated.tobytes()
    for got, want in zip((dx, dgamma, dbeta),
                         fastbn.backward(gated, x, stats, gamma, axis=axis, training=training)):
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", [((3, 4, 5), 1), ((6, 4), 1), ((2, 3, 3, 4), -1)],
                         ids=["NCL", "NxD", "NHWC"])
def test_finite_differences(shape, axis, training, rng):
    """Gradients of ``sum(w · relu(BN(x) + residual))`` with respect to x, gamma, beta and the
    residual, against central differences (the data keep every value away from the kink)."""
    x, _, gamma, beta, rm, rv = make_case(rng, shape, axis, np.float64)
    residual = make_x(rng, shape, axis, np.float64, offset=0.0, scale=1.0)
    w = rng.standard_normal(shape)
    running = dict(running_mean=rm, running_var=rv) if not training else {}

    def loss():
        y, _ = fastbn.forward(x, gamma, beta, axis=axis, training=training, residual=residual,
                              activation="relu", **running)
        return float(np.sum(w * y))

    y, stats = fastbn.forward(x, gamma, beta, axis=axis, training=training, residual=residual,
                              activation="relu", **running)
    pre, _, _ = reference_fused(x, residual, None, gamma, beta, axis, training, rm, rv)
    residual += np.where(np.abs(pre) < 0.05, 0.1, 0.0)  # off the kink by more than h moves it
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, training=training, residual=residual,
                              activation="relu", **running)
    dresidual = np.empty_like(x)
    dx, dgamma, dbeta = fastbn.backward(w, x, stats, gamma, axis=axis, training=training,
                                        activation="relu", y=y, dresidual=dresidual)
    assert np.count_nonzero(y == 0) > 0, "some values must be cut by the ReLU"
    for name, got, wrt in (("dx", dx, x), ("dgamma", dgamma, gamma), ("dbeta", dbeta, beta),
                           ("dresidual", dresidual, residual)):
        assert_close(got, numeric_grad(loss, wrt), 1e-6, name)


@pytest.mark.parametrize("where", ["dy", "new"])
def test_dresidual_may_be_dy(where, rng):
    x, dy, gamma, beta, _, _ = make_case(rng, (5, 3, 4), 1, np.float32)
    residual = make_x(rng, x.shape, 1, np.float32, offset=0.0, scale=1.0)
    y, stats = fastbn.forward(x, gamma, beta, residual=residual, activation="relu")
    expected = fastbn.backward(dy, x, stats, gamma, activation="relu", y=y,
                               dresidual=np.empty_like(dy))
    gated = np.where(y > 0, dy, 0)
    target = dy if where == "dy" else np.empty_like(dy)
    got = fastbn.backward(dy, x, stats, gamma, activation="relu", y=y, dresidual=target)
    assert target.tobytes() == gated.tobytes()
    for a, b in zip(got, expected):
        assert a.tobytes() == b.tobytes()


def test_out_may_be_x_residual_or_y(rng):
    x, dy, gamma, beta, _, _ = make_case(rng, (4, 3, 6), 1, np.float64)
    residual = make_x(rng, x.shape, 1, np.float64, offset=0.0, scale=1.0)
    y, stats = fastbn.forward(x, gamma, beta, residual=residual, activation="relu")
    into_residual = residual.copy()
    fastbn.forward(x, gamma, beta, residual=into_residual, activation="relu", out=into_residual)
    assert into_residual.tobytes() == y.tobytes()
    dx, _, _ = fastbn.backward(dy, x, stats, gamma, activation="relu", y=y)
    into_y = y.copy()
    got, _, _ = fastbn.backward(dy, x, stats, gamma, activation="relu", y=into_y, out=into_y)
    assert got is into_y and into_y.tobytes() == dx.tobytes()


def test_non_contiguous_arrays_take_the_full_path(rng):
    """Strided and transposed residual, y and dresidual (copied, or written back): the results
    of contiguous ones."""
    x, dy, gamma, beta, _, _ = make_case(rng, (6, 3, 5), 1, np.float64)
    residual = make_x(rng, x.shape, 1, np.float64, offset=0.0, scale=1.0)
    y, stats = fastbn.forward(x, gamma, beta, residual=residual, activation="relu")
    residual_f = np.asfortranarray(residual)
    y_f, _ = fastbn.forward(x, gamma, beta, residual=residual_f, activation="relu")
    assert y_f.tobytes() == y.tobytes()
    dresidual = np.empty_like(dy)
    expected = fastbn.backward(dy, x, stats, gamma, activation="relu", y=y, dresidual=dresidual)
    wide = np.empty((6, 6, 5))
    strided = wide[:, ::2]
    got = fastbn.backward(dy, x, stats, gamma, activation="relu", y=np.asfortranarray(y),
                          dresidual=strided)
    assert strided.tobytes() == dresidual.tobytes()
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-13)


# -- errors: clear, naming the argument, nothing modified -----------------------------------------


def _error_case(rng):
    x, dy, gamma, beta, rm, rv = make_case(rng, (4, 3, 5), 1, np.float32)
    residual = make_x(rng, x.shape, 1, np.float32)
    y, stats = fastbn.forward(x, gamma, beta, residual=residual, activation="relu")
    return x, dy, gamma, beta, rm, rv, residual, y, stats


@pytest.mark.parametrize("activation,error", [("gelu", ValueError), ("RELU", ValueError),
                                              (1, TypeError), (True, TypeError),
                                              (np.array("relu"), TypeError)])
def test_unknown_activation(activation, error, rng):
    x, dy, gamma, beta, rm, rv, _residual, y, stats = _error_case(rng)
    snapshot = Snapshot(rm=rm, rv=rv, x=x, dy=dy, y=y)
    with pytest.raises(error, match="activation"):
        fastbn.forward(x, gamma, beta, running_mean=rm, running_var=rv, activation=activation)
    with pytest.raises(error, match="activation"):
        fastbn.backward(dy, x, stats, gamma, activation=activation, y=y)
    with pytest.raises(error, match="activation"):
        fastbn.BatchNorm(3, activation=activation)
    snapshot.assert_unchanged()


def test_forward_errors_modify_nothing(rng):
    x, _dy, gamma, beta, rm, rv, residual, _y, _stats = _error_case(rng)
    out = np.zeros_like(x)
    snapshot = Snapshot(rm=rm, rv=rv, out=out, x=x, residual=residual)
    cases = [
        (dict(residual=residual[:, :2]), ValueError, r"residual must have x's shape \(4, 3, 5\)"),
        (dict(residual=residual.astype(np.float64)), TypeError, "residual must have x's dtype"),
        (dict(residual=residual.astype(np.int32)), TypeError, "residual must be a float32"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            fastbn.forward(x, gamma, beta, running_mean=rm, running_var=rv, out=out,
                           activation="relu", **options)
    shared = np.zeros((2, 4, 3, 5), np.float32)
    with pytest.raises(ValueError, match="out .* partly overlaps residual"):
        fastbn.forward(x, gamma, beta, running_mean=rm, running_var=rv,
                       residual=shared.reshape(-1)[:60].reshape(4, 3, 5),
                       out=shared.reshape(-1)[1:61].reshape(4, 3, 5))
    snapshot.assert_unchanged()


def test_backward_errors_modify_nothing(rng):
    x, dy, gamma, _beta, _rm, _rv, _residual, y, stats = _error_case(rng)
    out = np.zeros_like(x)
    dresidual = np.zeros_like(x)
    snapshot = Snapshot(out=out, dresidual=dresidual, x=x, dy=dy, y=y)
    cases = [
        (dict(activation="relu"), ValueError, "activation='relu' needs y"),
        (dict(y=y), ValueError, "y is the forward's output for activation='relu'"),
        (dict(activation="relu", y=y[:, :2]), ValueError, r"y must have x's shape"),
        (dict(activation="relu", y=y.astype(np.float64)), TypeError, "y must have x's dtype"),
        (dict(activation="relu", y=y, dresidual=dresidual[:, :2]), ValueError,
         "dresidual must have x's shape"),
        (dict(activation="relu", y=y, dresidual=dresidual.astype(np.float64)), TypeError,
         "dresidual must have x's dtype"),
        (dict(activation="relu", y=y, dresidual=x), ValueError, "dresidual shares memory with x"),
        (dict(activation="relu", y=y, dresidual=y), ValueError, "dresidual shares memory with y"),
        (dict(activation="relu", y=y, dresidual=out), ValueError,
         "dresidual shares memory with out"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            fastbn.backward(dy, x, stats, gamma, out=out, **options)
    read_only = np.zeros_like(x)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="dresidual is read-only"):
        fastbn.backward(dy, x, stats, gamma, activation="relu", y=y, dresidual=read_only)
    with pytest.raises(ValueError, match="dresidual shares memory with out"):
        fastbn.backward(dy, x, stats, gamma, activation="relu", y=y, dresidual=dy, out=dy)
    part = np.zeros(200, np.float32)
    dy_in_part = part[:60].reshape(x.shape)
    dy_in_part[...] = dy
    with pytest.raises(ValueError, match="dresidual .* partly overlaps dy"):
        fastbn.backward(dy_in_part, x, stats, gamma, activation="relu", y=y,
                        dresidual=part[1:61].reshape(x.shape))
    snapshot.assert_unchanged()


# -- the layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "residual+relu"])
def test_layer(with_residual, rng):
    x, dy, gamma, beta, _, _ = make_case(rng, (8, 3, 4, 4), 1, np.float32)
    residual = make_x(rng, x.shape, 1, np.float32, offset=0.0, scale=1.0) if with_residual \
        else None
    bn = fastbn.BatchNorm2d(3, activation="relu")
    plain = fastbn.BatchNorm2d(3)
    assert "activation='relu'" in repr(bn)
    for layer in (bn, plain):
        layer.gamma[...] = gamma
        layer.beta[...] = beta
    for step in range(2):
        y = bn(x, residual)
        plain_y = plain(x)
        expected = np.maximum(plain_y.astype(np.float64)
                              + (0 if residual is None else residual), 0)
        assert_close(y, expected, 1e-6, "y")
        assert bn.running_mean.tobytes() == plain.running_mean.tobytes()
        assert bn.running_var.tobytes() == plain.running_var.tobytes()
        result = bn.backward(dy)
        gated = np.where(y > 0, dy, 0).astype(np.float32)
        plain_dx = plain.backward(gated)
        if with_residual:
            dx, dresidual = result
            assert dresidual.tobytes() == gated.tobytes()
        else:
            dx = result
        assert dx.tobytes() == plain_dx.tobytes()
        assert bn.grads()["gamma"].tobytes() == plain.grads()["gamma"].tobytes()
        bn.eval()
        plain.eval()


def test_layer_errors_leave_it_as_it_was(rng):
    x, dy, _gamma, _beta, _, _ = make_case(rng, (8, 3, 5), 1, np.float32)
    bn = fastbn.BatchNorm1d(3, activation="relu")
    y = bn(x)
    state = {k: v.copy() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="residual must have x's shape"):
        bn(x, x[:, :2])
    for key, value in bn.state_dict().items():
        assert value.tobytes() == state[key].tobytes(), key
    dx = bn.backward(dy)  # still the backward of the first forward
    stats_y, stats = fastbn.forward(x, bn.gamma, bn.beta, activation="relu")
    assert stats_y.tobytes() == y.tobytes()
    assert dx.tobytes() == fastbn.backward(dy, x, stats, bn.gamma, activation="relu",
                                           y=y)[0].tobytes()


# -- PyTorch --------------------------------------------------------------------------------------


@each_mode
@pytest.mark.parametrize("shape,axis", [((6, 4, 5, 5), 1), ((32, 7), 1)], ids=["NCHW", "NxD"])
def test_against_pytorch(shape, axis, training, rng):
    torch = pytest.importorskip("torch")
    x, dy, gamma, beta, rm, rv = make_case(rng, shape, axis, np.float64)
    residual = make_x(rng, shape, axis, np.float64, offset=0.0, scale=1.0)
    tx = torch.tensor(x, requires_grad=True)
    tg = torch.tensor(gamma, requires_grad=True)
    tb = torch.tensor(beta, requires_grad=True)
    tr = torch.tensor(residual, requires_grad=True)
    ty = torch.relu(torch.nn.functional.batch_norm(
        tx, torch.tensor(rm), torch.tensor(rv), tg, tb, training=training) + tr)
    ty.backward(torch.tensor(dy))
    y, stats = fastbn.forward(x, gamma, beta, training=training, running_mean=rm.copy(),
                              running_var=rv.copy(), residual=residual, activation="relu")
    dresidual = np.empty_like(dy)
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, training=training,
                                        activation="relu", y=y, dresidual=dresidual)
    for name, got, want in (("y", y, ty.detach()), ("dx", dx, tx.grad), ("dgamma", dgamma, tg.grad),
                            ("dbeta", dbeta, tb.grad), ("dresidual", dresidual, tr.grad)):
        assert_close(got, want.numpy(), 1e-10, name)
