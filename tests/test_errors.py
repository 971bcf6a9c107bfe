"""Every documented error: its type, a message naming the argument (and shapes), and no
argument modified by the failed call."""

import numpy as np
import pytest

import fastbn

from _util import Snapshot, make_x

SHAPE = (4, 3, 5)  # C = 3


def _arrays_in(args, kwargs):
    found = {}
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray):
            found[f"arg{i}"] = a
        elif isinstance(a, tuple):  # stats
            for j, b in enumerate(a):
                if isinstance(b, np.ndarray):
                    found[f"arg{i}.{j}"] = b
    for k, a in kwargs.items():
        if isinstance(a, np.ndarray):
            found[k] = a
    return found


def check_raises(exc, name, shapes, func, *args, **kwargs):
    """func(*args, **kwargs) raises exc; the message matches the regex `name` and contains every
    string in `shapes`; every array argument is bitwise unchanged."""
    snap = Snapshot(**_arrays_in(args, kwargs))
    with pytest.raises(exc, match=name) as info:
        func(*args, **kwargs)
    msg = str(info.value)
    for s in shapes:
        assert s in msg, f"message {msg!r} does not mention {s}"
    snap.assert_unchanged()
    return msg


def fwd_kwargs(rng, dtype=np.float64, shape=SHAPE, **over):
    """A valid forward call (gamma, beta, running stats and out all given), then overrides."""
    c = shape[1]
    kw = dict(
        x=make_x(rng, shape, 1, dtype),
        gamma=rng.uniform(0.5, 2.0, c), beta=rng.uniform(-1, 1, c),
        axis=1, training=True, running_mean=rng.uniform(-1, 1, c),
        running_var=rng.uniform(0.5, 2.0, c), momentum=0.1, eps=1e-5,
        out=np.full(shape, 7.0, dtype=dtype),
    )
    kw.update(over)
    return kw


def call_forward(kw):
    kw = dict(kw)
    x, gamma, beta = kw.pop("x"), kw.pop("gamma"), kw.pop("beta")
    return (fastbn.forward, x, gamma, beta), kw


def bwd_kwargs(rng, dtype=np.float64, shape=SHAPE, **over):
    c = shape[1]
    kw = dict(
        dy=make_x(rng, shape, 1, dtype), x=make_x(rng, shape, 1, dtype),
        stats=fastbn.BatchStats(rng.uniform(-1, 1, c), rng.uniform(0.5, 2.0, c)),
        gamma=rng.uniform(0.5, 2.0, c), axis=1, training=True,
        out=np.full(shape, 7.0, dtype=dtype),
    )
    kw.update(over)
    return kw


def call_backward(kw):
    kw = dict(kw)
    dy, x, stats, gamma = kw.pop("dy"), kw.pop("x"), kw.pop("stats"), kw.pop("gamma")
    return (fastbn.backward, dy, x, stats, gamma), kw


def read_only(a):
    a.flags.writeable = False
    return a


def overlapping(rng, shift):
    """(a, b): two SHAPE arrays in one buffer, b starting `shift` elements after a (before a if
    shift is negative), so that they partly overlap."""
    n = int(np.prod(SHAPE))
    base = rng.standard_normal(n + abs(shift))
    first, second = base[:n].reshape(SHAPE), base[abs(shift):abs(shift) + n].reshape(SHAPE)
    return (first, second) if shift > 0 else (second, first)


X = r"\bx\b"


# ---------------------------------------------------------------- forward: TypeError

@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128, np.float16,
                                   object], ids=["int64", "int32", "bool", "complex", "f16", "obj"])
def test_forward_x_bad_dtype(dtype, rng):
    x = make_x(rng, SHAPE, 1).astype(dtype)
    args, kw = call_forward(fwd_kwargs(rng, x=x, out=None))
    msg = check_raises(TypeError, X, [str(SHAPE), "float32 or float64"], *args, **kw)
    if dtype is np.float16:
        assert "cast float16 data to float32" in msg
    cast = "; cast it to float32 or float64 first (x.astype(np.float32))"
    if np.dtype(dtype).kind in "iub":
        assert msg.endswith(cast), msg
    else:  # a cast would lose the imaginary part, or cannot be guessed
        assert cast not in msg, msg


def test_forward_out_dtype(rng):
    args, kw = call_forward(fwd_kwargs(rng, out=np.zeros(SHAPE, np.float32)))
    check_raises(TypeError, "out", [], *args, **kw)


def test_forward_out_not_ndarray(rng):
    args, kw = call_forward(fwd_kwargs(rng, out=np.zeros(SHAPE).tolist()))
    check_raises(TypeError, "out", [], *args, **kw)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("bad", ["list", "int64", "complex", "bool"])
def test_forward_running_stats_type(which, bad, rng):
    good = rng.uniform(0.5, 2.0, 3)
    value = {"list": good.tolist(), "int64": np.array([1, 2, 3]),
             "complex": good.astype(np.complex128), "bool": np.ones(3, bool)}[bad]
    args, kw = call_forward(fwd_kwargs(rng, **{which: value}))
    check_raises(TypeError, which, [], *args, **kw)


# ---------------------------------------------------------------- forward: ValueError

@pytest.mark.parametrize("shape", [(5,), ()], ids=["1d", "0d"])
def test_forward_ndim_too_small(shape, rng):
    x = rng.standard_normal(shape)
    check_raises(ValueError, X, [str(shape)], fastbn.forward, x)


@pytest.mark.parametrize("axis", [3, -4, 10])
def test_forward_axis_out_of_range(axis, rng):
    args, kw = call_forward(fwd_kwargs(rng, axis=axis))
    check_raises(ValueError, "axis", [], *args, **kw)


@pytest.mark.parametrize("which", ["gamma", "beta", "running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(4,), (1,), (3, 1), (2,)])
def test_forward_parameter_shape(which, shape, rng):
    args, kw = call_forward(fwd_kwargs(rng, **{which: rng.uniform(0.5, 1.0, shape)}))
    check_raises(ValueError, which, [str(shape), "(3,)"], *args, **kw)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_forward_only_one_running_stat(given, training, rng):
    kw = fwd_kwargs(rng, training=training)
    missing = "running_var" if given == "running_mean" else "running_mean"
    kw[missing] = None
    args, kw = call_forward(kw)
    check_raises(ValueError, "running_(mean|var)", [], *args, **kw)


def test_forward_eval_without_running_stats(rng):
    args, kw = call_forward(fwd_kwargs(rng, training=False, running_mean=None, running_var=None))
    check_raises(ValueError, "running_(mean|var)", [], *args, **kw)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (0, 3), (0, 3, 4)])
def test_forward_one_value_per_channel_in_training(shape, rng):
    args, kw = call_forward(fwd_kwargs(rng, shape=shape))
    check_raises(ValueError, X + "|training", [str(shape)], *args, **kw)


@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 4), 1), ((2, 0, 3), -1)])
def test_empty_batch_in_eval_gives_empty_outputs(shape, axis, rng):
    """Eval needs no batch statistics: an empty batch maps to an empty y, and its gradient is
    empty with dgamma = dbeta = 0. (Training on it is a ValueError, above.)"""
    x = np.zeros(shape, np.float32)
    rm, rv = rng.uniform(-1, 1, 3), rng.uniform(0.5, 2, 3)
    snap = Snapshot(rm=rm, rv=rv)
    y, stats = fastbn.forward(x, axis=axis, training=False, running_mean=rm, running_var=rv)
    snap.assert_unchanged()
    assert y.shape == shape and y.dtype == np.float32
    np.testing.assert_array_equal(stats.mean, rm)
    dx, dgamma, dbeta = fastbn.backward(x, x, stats, np.ones(3), axis=axis, training=False)
    assert dx.shape == shape and not dgamma.any() and not dbeta.any()


def test_forward_one_value_per_channel_channels_last(rng):
    x = rng.standard_normal((1, 1, 1, 3))
    rm, rv = np.zeros(3), np.ones(3)
    check_raises(ValueError, X + "|training", ["(1, 1, 1, 3)"], fastbn.forward, x, axis=-1,
                 running_mean=rm, running_var=rv)


@pytest.mark.parametrize("eps", [0.0, -1e-5, -1.0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_eps(eps, training, rng):
    args, kw = call_forward(fwd_kwargs(rng, eps=eps, training=training))
    check_raises(ValueError, "eps", [], *args, **kw)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, -1e-9, 1.0 + 1e-9])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_momentum(momentum, training, rng):
    args, kw = call_forward(fwd_kwargs(rng, momentum=momentum, training=training))
    check_raises(ValueError, "momentum", [], *args, **kw)


@pytest.mark.parametrize("shape", [(4, 3, 6), (3, 4, 5), (4, 15), (4, 3, 5, 1)])
def test_forward_out_shape(shape, rng):
    args, kw = call_forward(fwd_kwargs(rng, out=np.zeros(shape)))
    check_raises(ValueError, "out", [str(shape)], *args, **kw)


def test_forward_out_read_only(rng):
    args, kw = call_forward(fwd_kwargs(rng, out=read_only(np.zeros(SHAPE))))
    check_raises(ValueError, "out", [], *args, **kw)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_forward_running_stats_read_only_in_training(which, rng):
    kw = fwd_kwargs(rng)
    kw[which].flags.writeable = False
    args, kw = call_forward(kw)
    check_raises(ValueError, which, [], *args, **kw)


def test_forward_running_stats_read_only_fine_in_eval(rng):
    kw = fwd_kwargs(rng, training=False, out=None)
    kw["running_mean"].flags.writeable = False
    kw["running_var"].flags.writeable = False
    args, kw = call_forward(kw)
    y, stats = args[0](*args[1:], **kw)
    assert y.shape == SHAPE and np.all(np.isfinite(y))


@pytest.mark.parametrize("shift", [1, -1, 5])
def test_forward_out_partly_overlapping_x(shift, rng):
    x, out = overlapping(rng, shift)
    args, kw = call_forward(fwd_kwargs(rng, x=x, out=out))
    check_raises(ValueError, "out", [], *args, **kw)


def test_forward_out_overlapping_strided(rng):
    """out interleaves with x (same buffer, different elements): no element is shared, but an
    implementation may still refuse it; if it accepts, the result must be right."""
    base = rng.standard_normal((4, 3, 10))
    x, out = base[..., ::2], base[..., 1::2]
    x0 = x.copy()
    try:
        y, _ = fastbn.forward(x, out=out)
    except ValueError as e:
        assert "out" in str(e)
        assert np.array_equal(x, x0)
    else:
        assert y is out and np.array_equal(x, x0)
        ry, _ = fastbn.forward(x0)
        assert np.array_equal(out, ry)


@pytest.mark.parametrize("device", ["gpu", "CPU", "", "cuda:0", 0])
def test_forward_bad_device(device, rng):
    args, kw = call_forward(fwd_kwargs(rng, device=device))
    check_raises(ValueError, "device", [], *args, **kw)


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without a usable CUDA GPU, wherever the tests run."""
    import fastbn._checks
    monkeypatch.setattr(fastbn._checks, "cuda_available", lambda: False)


def test_forward_cuda_device_unavailable(rng, no_gpu):
    args, kw = call_forward(fwd_kwargs(rng, device="cuda"))
    check_raises(RuntimeError, r'pip install "fastbn\[cuda\]"', [], *args, **kw)


def test_forward_cuda_by_environment_unavailable(rng, no_gpu, monkeypatch):
    monkeypatch.setenv("FASTBN_DEVICE", "cuda")
    args, kw = call_forward(fwd_kwargs(rng))
    check_raises(RuntimeError, "FASTBN_DEVICE", [], *args, **kw)


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:0"])
def test_forward_bad_device_in_environment(value, rng, monkeypatch):
    monkeypatch.setenv("FASTBN_DEVICE", value)
    args, kw = call_forward(fwd_kwargs(rng))
    check_raises(ValueError, "FASTBN_DEVICE", [], *args, **kw)


# ---------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128, np.float16,
                                   object], ids=["int64", "int32", "bool", "complex", "f16", "obj"])
def test_backward_dy_bad_dtype(dtype, rng):
    kw = bwd_kwargs(rng, out=None)
    kw["dy"] = kw["dy"].astype(dtype)
    args, kw = call_backward(kw)
    msg = check_raises(TypeError, "dy", [], *args, **kw)
    if np.dtype(dtype).kind in "iub":  # dy must have x's dtype: the hint says so
        assert msg.endswith("; cast it to float32 or float64 first (dy.astype(x.dtype))"), msg


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex128, np.float16],
                         ids=["int64", "bool", "complex", "f16"])
def test_backward_x_bad_dtype(dtype, rng):
    kw = bwd_kwargs(rng, out=None)
    kw["x"] = kw["x"].astype(dtype)
    kw["dy"] = kw["dy"].astype(dtype) if dtype is not np.bool_ else kw["dy"]
    args, kw = call_backward(kw)
    check_raises(TypeError, X + "|dy", [], *args, **kw)


@pytest.mark.parametrize("xdtype,dydtype", [(np.float64, np.float32), (np.float32, np.float64)])
def test_backward_dy_dtype_differs_from_x(xdtype, dydtype, rng):
    kw = bwd_kwargs(rng, dtype=xdtype)
    kw["dy"] = kw["dy"].astype(dydtype)
    args, kw = call_backward(kw)
    check_raises(TypeError, "dy", [], *args, **kw)


def test_backward_out_dtype(rng):
    args, kw = call_backward(bwd_kwargs(rng, out=np.zeros(SHAPE, np.float32)))
    check_raises(TypeError, "out", [], *args, **kw)


def test_backward_out_not_ndarray(rng):
    args, kw = call_backward(bwd_kwargs(rng, out=np.zeros(SHAPE).tolist()))
    check_raises(TypeError, "out", [], *args, **kw)


def test_backward_ndim_too_small(rng):
    x = rng.standard_normal(5)
    stats = fastbn.BatchStats(np.zeros(5), np.ones(5))
    check_raises(ValueError, X + "|dy", ["(5,)"], fastbn.backward, x.copy(), x, stats)


@pytest.mark.parametrize("shape", [(4, 3, 6), (3, 4, 5), (4, 15), (4, 3, 5, 1)])
def test_backward_dy_shape(shape, rng):
    args, kw = call_backward(bwd_kwargs(rng, dy=rng.standard_normal(shape)))
    check_raises(ValueError, "dy", [str(shape), str(SHAPE)], *args, **kw)


@pytest.mark.parametrize("axis", [3, -4])
def test_backward_axis_out_of_range(axis, rng):
    args, kw = call_backward(bwd_kwargs(rng, axis=axis))
    check_raises(ValueError, "axis", [], *args, **kw)


@pytest.mark.parametrize("shape", [(4,), (1,), (3, 1)])
def test_backward_gamma_shape(shape, rng):
    args, kw = call_backward(bwd_kwargs(rng, gamma=rng.uniform(0.5, 1.0, shape)))
    check_raises(ValueError, "gamma", [str(shape), "(3,)"], *args, **kw)


@pytest.mark.parametrize("which", [0, 1], ids=["mean", "invstd"])
@pytest.mark.parametrize("shape", [(2,), (4,), (3, 1)])
def test_backward_stats_shape(which, shape, rng):
    kw = bwd_kwargs(rng)
    parts = list(kw["stats"])
    parts[which] = rng.uniform(0.5, 1.0, shape)
    kw["stats"] = fastbn.BatchStats(*parts)
    args, kw = call_backward(kw)
    name = "stats|" + ("mean" if which == 0 else "invstd")
    check_raises(ValueError, name, [str(shape)], *args, **kw)


@pytest.mark.parametrize("shape", [(4, 3, 6), (4, 15)])
def test_backward_out_shape(shape, rng):
    args, kw = call_backward(bwd_kwargs(rng, out=np.zeros(shape)))
    check_raises(ValueError, "out", [str(shape)], *args, **kw)


def test_backward_out_read_only(rng):
    args, kw = call_backward(bwd_kwargs(rng, out=read_only(np.zeros(SHAPE))))
    check_raises(ValueError, "out", [], *args, **kw)


@pytest.mark.parametrize("shift", [1, -1])
def test_backward_out_partly_overlapping_x(shift, rng):
    x, out = overlapping(rng, shift)
    args, kw = call_backward(bwd_kwargs(rng, x=x, out=out))
    check_raises(ValueError, "out", [], *args, **kw)


def test_backward_out_partly_overlapping_dy(rng):
    """Partial overlap with dy cannot be computed in place: refuse it, or get it right."""
    dy, out = overlapping(rng, 1)
    kw = bwd_kwargs(rng, dy=dy, out=out)
    dy0 = dy.copy()
    expected = fastbn.backward(dy0, kw["x"], kw["stats"], kw["gamma"])[0]
    try:
        args, kw2 = call_backward(kw)
        dx = args[0](*args[1:], **kw2)[0]
    except ValueError as e:
        assert "out" in str(e)
        assert np.array_equal(dy, dy0)
    else:
        assert np.array_equal(dx, expected)


@pytest.mark.parametrize("device", ["gpu", "", 1])
def test_backward_bad_device(device, rng):
    args, kw = call_backward(bwd_kwargs(rng, device=device))
    check_raises(ValueError, "device", [], *args, **kw)


def test_backward_cuda_device_unavailable(rng, no_gpu):
    args, kw = call_backward(bwd_kwargs(rng, device="cuda"))
    check_raises(RuntimeError, r'pip install "fastbn\[cuda\]"', [], *args, **kw)


@pytest.mark.parametrize("training", ["no", None, 1, np.array([True, False])])
def test_forward_training_must_be_a_flag(training, rng):
    (f, *args), kw = call_forward(fwd_kwargs(rng, training=training))
    check_raises(TypeError, "training", [], f, *args, **kw)


@pytest.mark.parametrize("training", ["yes", None])
def test_backward_training_must_be_a_flag(training, rng):
    (f, *args), kw = call_backward(bwd_kwargs(rng, training=training))
    check_raises(TypeError, "training", [], f, *args, **kw)


@pytest.mark.parametrize("axis", [True, 1.0, "1"])
def test_forward_axis_must_be_an_integer(axis, rng):
    (f, *args), kw = call_forward(fwd_kwargs(rng, axis=axis))
    check_raises(TypeError, "axis", [], f, *args, **kw)


@pytest.mark.parametrize("which, alias", [("running_mean", "running_var"), ("running_mean", "x"),
                                          ("running_mean", "out"), ("running_var", "x"),
                                          ("running_var", "out")])
def test_forward_running_stats_sharing_memory(which, alias, rng):
    """Running statistics are written in place after y: sharing memory would corrupt them."""
    kw = fwd_kwargs(rng)
    if alias == "running_var":
        kw["running_mean"] = kw["running_var"]
    else:
        kw[which] = kw[alias][0, :, 0]
    (f, *args), kw = call_forward(kw)
    check_raises(ValueError, "shares memory", [], f, *args, **kw)


@pytest.mark.parametrize("bad", [np.zeros((3, 1)), np.float64(0.0)])
def test_inference_affine_running_mean_not_1d(bad):
    check_raises(ValueError, "running_mean", [str(np.shape(bad))], fastbn.inference_affine,
                 None, None, bad, np.ones(3))


def test_inference_affine_parameter_shape():
    check_raises(ValueError, "gamma", ["(2,)", "(3,)"], fastbn.inference_affine,
                 np.ones(2), None, np.zeros(3), np.ones(3))


def test_fold_weight_channels():
    check_raises(ValueError, "weight", ["(4, 5)"], fastbn.fold,
                 np.ones((4, 5)), None, None, None, np.zeros(3), np.ones(3))
