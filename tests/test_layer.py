"""fastbn.BatchNorm: step for step against the float64 reference and torch.nn.BatchNorm*d."""
import re

import numpy as np
import pytest

import fastbn

import reference
from _util import assert_close, make_x

SHAPES = [((16, 5), 1), ((6, 4, 7), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((3, 2, 4, 5, 3), 1)]
STEPS = 4


def _sgd(layer, lr=0.1):
    for name, p in layer.params().items():
        p -= lr * layer.grads()[name]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_training_steps_then_eval_against_reference(shape, axis, momentum, rng):
    c = shape[axis]
    bn = fastbn.BatchNorm(c, axis=axis, momentum=momentum, dtype=np.float64)
    gamma, beta = np.ones(c), np.zeros(c)
    rm, rv = np.zeros(c), np.ones(c)
    for step in range(1, STEPS + 1):
        x = make_x(rng, shape, axis, np.float64, offset=rng.uniform(-3, 3, c))
        dy = rng.standard_normal(shape)
        weight = 0.1 if momentum is not None else 1.0 / step
        ry, mean, invstd, rm, rv = reference.forward(x, gamma, beta, axis, True, rm, rv, weight)
        assert_close(bn(x), ry, 1e-10, f"y, step {step}")
        rdx, rdgamma, rdbeta = reference.backward(dy, x, mean, invstd, gamma, axis)
        assert_close(bn.backward(dy), rdx, 1e-10, f"dx, step {step}")
        assert_close(bn.grads()["gamma"], rdgamma, 1e-10, "dgamma")
        assert_close(bn.grads()["beta"], rdbeta, 1e-10, "dbeta")
        _sgd(bn)
        gamma, beta = gamma - 0.1 * rdgamma, beta - 0.1 * rdbeta
        assert_close(bn.running_mean, rm, 1e-10, "running_mean")
        assert_close(bn.running_var, rv, 1e-10, "running_var")
    assert bn.num_batches_tracked == STEPS
    x = make_x(rng, shape, axis, np.float64)
    assert bn.eval() is bn and not bn.training
    ry, mean, invstd, _, _ = reference.forward(x, gamma, beta, axis, False, rm, rv)
    assert_close(bn(x), ry, 1e-10, "eval y")
    dy = rng.standard_normal(shape)
    assert_close(bn.backward(dy), reference.backward(dy, x, mean, invstd, gamma, axis,
                                                     False)[0], 1e-10, "eval dx")
    assert bn.num_batches_tracked == STEPS  # eval leaves the running statistics alone
    assert_close(bn.running_mean, rm, 1e-10, "running_mean after eval")


def test_without_affine_and_without_running_statistics(rng):
    bn = fastbn.BatchNorm(3, affine=False, track_running_stats=False, dtype=np.float64)
    assert bn.params() == {} and bn.gamma is None and bn.running_mean is None
    x = make_x(rng, (5, 3, 4), 1, np.float64)
    bn.eval()  # no running statistics: batch statistics in eval mode too
    assert_close(bn(x), reference.forward(x)[0], 1e-10, "y")
    assert bn.num_batches_tracked is None


def test_backward_before_forward_is_an_error():
    with pytest.raises(RuntimeError, match="forward first"):
        fastbn.BatchNorm(3).backward(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_features=0), "num_features"), (dict(num_features=2.5), "num_features"),
    (dict(num_features=3, momentum=1.5), "momentum"), (dict(num_features=3, momentum=-0.1),
                                                       "momentum"),
    (dict(num_features=3, eps=0.0), "eps"), (dict(num_features=3, dtype=np.int32), "dtype"),
    (dict(num_features=3, dtype=np.float16), "dtype"), (dict(num_features=3, axis=1.0), "axis")])
def test_bad_construction(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        fastbn.BatchNorm(**kwargs)


def _everything(bn):
    return {**bn.state_dict(), "dgamma": bn.dgamma, "dbeta": bn.dbeta}


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) if a[k] is not None
                                        else b[k] is None for k in a)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_failed_calls_change_nothing(training, rng):
    """A bad forward or backward raises, and leaves the layer's state, gradients and the
    forward that backward differentiates as they were."""
    bn = fastbn.BatchNorm(3).train(training)
    x = make_x(rng, (4, 3), 1, np.float32)
    y = bn(x)
    bn.backward(np.ones_like(y))
    before = _everything(bn)
    bad_inputs = [np.ones((4, 5), np.float32), np.ones((4, 3), np.int32), np.ones(3, np.float32),
                  np.ones((4, 3), np.float16)]
    if training:
        bad_inputs.append(np.ones((1, 3), np.float32))  # one value per channel
    for bad in bad_inputs:
        with pytest.raises((TypeError, ValueError), match=r"\bx\b"):
            bn(bad)
        assert _same(before, _everything(bn))
    for bad in (np.ones((4, 5), np.float32), np.ones((4, 3), np.float64)):
        with pytest.raises((TypeError, ValueError), match="dy"):
            bn.backward(bad)
        assert _same(before, _everything(bn))
    # backward still differentiates the last good forward
    np.testing.assert_array_equal(bn.backward(np.ones_like(y)), fastbn.backward(
        np.ones_like(y), x, fastbn.forward(x, training=True)[1] if training else
        fastbn.BatchStats(np.zeros(3), np.full(3, 1 / np.sqrt(1 + 1e-5))), bn.gamma,
        training=training)[0])


def _trained(bn, rng, shape=(4, 3)):
    """``bn`` after a forward and backward, and what must survive a failed call: its state,
    gradients, and the forward that backward differentiates."""
    y = bn(make_x(rng, shape, bn.axis, np.float32))
    bn.backward(np.ones_like(y))
    return _everything(bn), bn._saved


def _unchanged(bn, before):
    state, saved = before
    assert _same(state, _everything(bn)) and bn._saved is saved


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False),
                                          (False, False)],
                         ids=["affine+running", "running", "affine", "neither"])
@pytest.mark.parametrize("cls", [fastbn.BatchNorm, fastbn.BatchNorm1d])
def test_wrong_feature_count_names_the_layer(cls, affine, track, training, rng):
    """Whatever the layer holds (PyTorch raises in every case), the message is the layer's: as
    constructed, the count it expects, the axis, and x's shape; nothing changes."""
    bn = cls(100, affine=affine, track_running_stats=track)
    before = _trained(bn, rng, (4, 100))
    bn.train(training)
    expected = (f"{cls.__name__}(100) expects 100 features on axis 1, but x of shape (64, 128) "
                f"has 128 there")
    with pytest.raises(ValueError, match=re.escape(expected) + "$"):
        bn(np.ones((64, 128), np.float32))
    _unchanged(bn, before)


@pytest.mark.parametrize("make,shape,words", [
    (lambda: fastbn.BatchNorm2d(3), (8, 32, 32, 3),
     "BatchNorm2d(3) expects 3 features on axis 1, but x of shape (8, 32, 32, 3) has 32 there; "
     "if x's channels are on its last axis, construct the layer with axis=-1"),
    (lambda: fastbn.BatchNorm(4, axis=-1), (2, 4, 5),
     "BatchNorm(4, axis=-1) expects 4 features on axis -1, but x of shape (2, 4, 5) has 5 there; "
     "if x's channels are on axis 1, construct the layer with axis=1"),
    (lambda: fastbn.BatchNorm(4, axis=-1), (2, 3, 5),
     "BatchNorm(4, axis=-1) expects 4 features on axis -1, but x of shape (2, 3, 5) has 5 there"),
])
def test_wrong_feature_count_on_another_axis(make, shape, words, rng):
    bn = make()
    with pytest.raises(ValueError, match=re.escape(words) + "$"):
        bn(np.ones(shape, np.float32))
    assert bn.num_batches_tracked == 0 and bn._saved is None


def test_wrong_feature_count_of_a_list():
    bn = fastbn.BatchNorm(3)
    with pytest.raises(ValueError, match=re.escape("BatchNorm(3) expects 3 features on axis 1, "
                                                   "but x of shape (4, 5) has 5 there")):
        bn(np.ones((4, 5)).tolist())
    assert bn.num_batches_tracked == 0 and bn._saved is None


def test_x_without_the_channel_axis_gets_the_ops_message():
    with pytest.raises(ValueError, match=re.escape("x must have at least 2 dimensions")):
        fastbn.BatchNorm(5)(np.ones(5, np.float32))
    with pytest.raises(ValueError, match=re.escape("axis 3 is out of range for x of shape (2, 5)")):
        fastbn.BatchNorm(5, axis=3)(np.ones((2, 5), np.float32))


@pytest.mark.parametrize("shape", [(1, 100), (1, 100, 1), (0, 100)])
def test_a_batch_of_one_in_training_suggests_eval(shape, rng):
    bn = fastbn.BatchNorm1d(100)
    before = _trained(bn, rng, (4, 100))
    x = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=re.escape(
            f"BatchNorm1d(100): training needs more than one value per channel, but x of shape "
            f"{shape} has {shape[0]} per channel (channel axis 1); to normalize a single sample "
            f"with the running statistics, call the layer's .eval() first")):
        bn(x)
    _unchanged(bn, before)
    assert bn.eval()(x).shape == shape  # as the message says


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_batch_of_one_without_running_statistics_says_eval_would_not_help(training, rng):
    bn = fastbn.BatchNorm(3, track_running_stats=False)
    before = _trained(bn, rng)
    bn.train(training)
    with pytest.raises(ValueError, match=re.escape(
            "BatchNorm(3): training needs more than one value per channel, but x of shape (1, 3) "
            "has 1 per channel (channel axis 1); eval mode would not help: without running "
            "statistics (track_running_stats=False) the layer normalizes with the batch's "
            "statistics in eval mode too")):
        bn(np.ones((1, 3), np.float32))
    _unchanged(bn, before)


def test_the_eval_hint_is_the_layers_only():
    with pytest.raises(ValueError, match="more than one value per channel") as info:
        fastbn.forward(np.ones((1, 100), np.float32), running_mean=np.zeros(100),
                       running_var=np.ones(100))
    assert "eval" not in str(info.value)


def test_residual_and_dy_shape_errors_name_them(rng):
    bn = fastbn.BatchNorm(3, activation="relu")
    x = make_x(rng, (4, 3), 1, np.float32)
    y = bn(x, np.zeros_like(x))
    bn.backward(np.ones_like(y))
    before = _everything(bn), bn._saved
    with pytest.raises(ValueError, match=re.escape("residual must have x's shape (4, 3), got "
                                                   "(4, 5)")):
        bn(x, np.zeros((4, 5), np.float32))
    _unchanged(bn, before)
    with pytest.raises(ValueError, match=re.escape("dy must have x's shape (4, 3), got (4, 5)")):
        bn.backward(np.ones((4, 5), np.float32))
    _unchanged(bn, before)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_integer_x_says_to_cast(dtype, rng):
    bn = fastbn.BatchNorm1d(3)
    before = _trained(bn, rng)
    with pytest.raises(TypeError, match=re.escape(
            f"got dtype {np.dtype(dtype)} (shape (4, 3)); cast it to float32 or float64 first "
            f"(x.astype(np.float32))")):
        bn(np.ones((4, 3), dtype))
    _unchanged(bn, before)


def test_state_dict_round_trip_and_errors(rng):
    bn = fastbn.BatchNorm(4, dtype=np.float64)
    for _ in range(3):
        bn(make_x(rng, (8, 4), 1, np.float64, offset=2.0))
    bn.gamma[:] = rng.uniform(0.5, 2, 4)
    state = bn.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    other = fastbn.BatchNorm(4, dtype=np.float64)
    other.load_state_dict(state)
    loaded = other.state_dict()
    assert all(np.array_equal(state[k], loaded[k]) for k in state)

    fresh = fastbn.BatchNorm(4, dtype=np.float64)
    before = fresh.state_dict()
    bad_shape = dict(state, running_var=np.ones(5))
    missing = {k: v for k, v in state.items() if k != "bias"}
    for bad in (bad_shape, missing, dict(state, extra=np.ones(4))):
        with pytest.raises(ValueError):
            fresh.load_state_dict(bad)
        now = fresh.state_dict()
        assert all(np.array_equal(before[k], now[k]) for k in before), "left as it was"


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_matches_torch_step_for_step(shape, axis, momentum, rng):
    torch = pytest.importorskip("torch")
    c = shape[axis]
    ndim = len(shape)
    module = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
              5: torch.nn.BatchNorm3d}[ndim]
    tbn = module(c, momentum=momentum, dtype=torch.float64)
    bn = fastbn.BatchNorm(c, axis=axis, momentum=momentum, dtype=np.float64)
    bn.load_state_dict({k: v.detach().numpy() for k, v in tbn.state_dict().items()})
    opt = torch.optim.SGD(tbn.parameters(), lr=0.1)
    for step in range(STEPS):
        x = make_x(rng, shape, axis, np.float64, offset=rng.uniform(-3, 3, c))
        dy = rng.standard_normal(shape)
        tx = torch.from_numpy(np.moveaxis(x, axis, 1).copy()).requires_grad_()
        ty = tbn(tx)
        ty.backward(torch.from_numpy(np.moveaxis(dy, axis, 1).copy()))
        assert_close(bn(x), np.moveaxis(ty.detach().numpy(), 1, axis), 1e-10, "y")
        assert_close(bn.backward(dy), np.moveaxis(tx.grad.numpy(), 1, axis), 1e-10, "dx")
        opt.step()
        opt.zero_grad()
        _sgd(bn)
        for key, value in tbn.state_dict().items():
            assert_close(bn.state_dict()[key], value.numpy(), 1e-10, key)
    tbn.eval()
    bn.eval()
    x = make_x(rng, shape, axis, np.float64)
    ty = tbn(torch.from_numpy(np.moveaxis(x, axis, 1).copy()))
    assert_close(bn(x), np.moveaxis(ty.detach().numpy(), 1, axis), 1e-10, "eval y")


@pytest.mark.parametrize("cls,good,bad", [
    (fastbn.BatchNorm1d, [(8, 3), (8, 3, 5)], [(8, 3, 5, 5)]),
    (fastbn.BatchNorm2d, [(8, 3, 5, 5)], [(8, 3), (8, 3, 2, 5, 5)]),
    (fastbn.BatchNorm3d, [(8, 3, 2, 5, 5)], [(8, 3, 5, 5)]),
])
def test_fixed_rank_classes(cls, good, bad, rng):
    bn = cls(3, dtype=np.float64)
    for shape in good:
        x = make_x(rng, shape, 1, np.float64)
        assert_close(bn(x), reference.forward(x)[0], 1e-10, cls.__name__)
    for shape in bad:
        with pytest.raises(ValueError, match=cls.__name__):
            bn(np.ones(shape))
