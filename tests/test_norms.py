"""Layer, group, instance and RMS norm (fastbn._norms) against the float64 reference
(tests/reference.py ``normalize``), finite differences and PyTorch: values, exactness,
determinism, errors, layers."""
import os
import re
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest
import reference
from _util import (
    DTYPES,
    ROOT,
    Snapshot,
    assert_close,
    each_dtype,
    numeric_grad,
    tol_for,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastbn


class Norm(NamedTuple):
    """One op of the family on one shape: how to call it and what the reference does."""

    name: str
    shape: tuple
    arg: object  # normalized_shape, num_groups, or None (instance norm)
    kind: str  # the reference's grouping: "layer" or "group"

    @property
    def groups(self):
        return self.shape[1] if self.name == "instance" else self.arg

    @property
    def parameter_shape(self):
        if self.kind == "layer":
            return self.arg if isinstance(self.arg, tuple) else (self.arg,)
        return (self.shape[1],)

    @property
    def normalized_ndim(self):
        return len(self.parameter_shape) if self.kind == "layer" else 1

    @property
    def centred(self):
        return self.name != "rms"

    def forward(self, x, gamma=None, beta=None, **options):
        if self.name == "layer":
            return fastbn.layer_norm(x, self.arg, gamma, beta, **options)
        if self.name == "rms":
            return fastbn.rms_norm(x, self.arg, gamma, **options)
        if self.name == "group":
            return fastbn.group_norm(x, self.arg, gamma, beta, **options)
        return fastbn.instance_norm(x, gamma, beta, **options)

    def backward(self, dy, x, stats, gamma=None, **options):
        """``(dx, dgamma, dbeta)`` (dbeta None for RMS norm)."""
        if self.name == "layer":
            return fastbn.layer_norm_backward(dy, x, stats, self.arg, gamma, **options)
        if self.name == "rms":
            return (*fastbn.rms_norm_backward(dy, x, stats, self.arg, gamma, **options), None)
        if self.name == "group":
            return fastbn.group_norm_backward(dy, x, stats, self.arg, gamma, **options)
        return fastbn.instance_norm_backward(dy, x, stats, gamma, **options)

    def reference(self, x, gamma=None, beta=None, **stats):
        eps = 1e-5 if self.centred else float(np.finfo(np.asarray(x).dtype).eps)  # the defaults
        return reference.normalize(x, self.kind, eps, gamma, beta if self.centred else None,
                                   groups=self.groups, normalized_ndim=self.normalized_ndim,
                                   centred=self.centred, **stats)

    def reference_backward(self, dy, x, mean, invstd, gamma=None, training=True):
        return reference.normalize_backward(dy, x, mean, invstd, self.kind, gamma,
                                            groups=self.groups,
                                            normalized_ndim=self.normalized_ndim,
                                            training=training)

    def stats_shape(self):
        if self.kind == "layer":
            return self.shape[:len(self.shape) - self.normalized_ndim]
        return (self.shape[0], self.groups)

    def __str__(self):
        return f"{self.name}-{'x'.join(map(str, self.shape))}-{self.arg}"


# Rows longer than the tests' CHUNK (16, tests/_util.py) take several chunks, and more rows than
# NORM_BLOCKS (3) sum their parameter gradients in several blocks.
CASES = [
    Norm("layer", (7, 33), 33, "layer"),
    Norm("layer", (3, 4, 5, 6), (5, 6), "layer"),
    Norm("layer", (1, 40), 40, "layer"),
    Norm("layer", (5, 1), 1, "layer"),
    Norm("rms", (7, 33), 33, "layer"),
    Norm("rms", (2, 3, 4, 5), (4, 5), "layer"),
    Norm("group", (4, 6, 5, 7), 3, "group"),
    Norm("group", (3, 8, 9), 8, "group"),
    Norm("group", (5, 4), 2, "group"),
    Norm("group", (2, 6, 3, 4, 5), 1, "group"),
    Norm("instance", (4, 3, 11), None, "group"),
    Norm("instance", (2, 5, 6, 7), None, "group"),
    Norm("instance", (2, 3, 2, 3, 4), None, "group"),
]
each_case = pytest.mark.parametrize("case", CASES, ids=str)
OPS = {case.name: case for case in reversed(CASES)}  # the first case of each op


def _data(rng, case, dtype, offset=3.0):
    x = (rng.standard_normal(case.shape) * rng.uniform(0.5, 2.0) + offset).astype(dtype)
    dy = rng.standard_normal(case.shape).astype(dtype)
    gamma = (rng.uniform(0.5, 2.0, case.parameter_shape)
             * rng.choice([-1.0, 1.0], case.parameter_shape)).astype(dtype)
    beta = rng.uniform(-1.0, 1.0, case.parameter_shape).astype(dtype)
    return x, dy, gamma, beta if case.centred else None


@each_dtype
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@each_case
def test_matches_reference(case, affine, dtype, rng):
    x, dy, gamma, beta = _data(rng, case, dtype)
    if not affine:
        gamma = beta = None
    tol = tol_for(dtype)
    y, stats = case.forward(x, gamma, beta)
    ref_y, ref_mean, _, ref_invstd = case.reference(x, gamma, beta)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, ref_y, tol)
    assert stats.invstd.dtype == np.float64 and stats.invstd.shape == case.stats_shape()
    assert_close(stats.invstd.reshape(-1), ref_invstd, tol)
    if case.centred:
        assert stats.mean.dtype == np.float64 and stats.mean.shape == case.stats_shape()
        assert_close(stats.mean.reshape(-1), ref_mean, tol)
    else:
        assert stats.mean is None
    dx, dgamma, dbeta = case.backward(dy, x, stats, gamma)
    ref_dx, ref_dgamma, ref_dbeta = case.reference_backward(dy, x, ref_mean, ref_invstd, gamma)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert_close(dx, ref_dx, tol)
    assert dgamma.dtype == x.dtype and dgamma.shape == case.parameter_shape
    assert_close(dgamma.reshape(-1), ref_dgamma, tol)
    if case.centred:
        assert_close(dbeta.reshape(-1), ref_dbeta, tol)


@each_case
def test_backward_matches_finite_differences(case, rng):
    x, dy, gamma, beta = _data(rng, case, np.float64, offset=0.5)

    def loss():
        return float((case.forward(x, gamma, beta)[0] * dy).sum())

    _, stats = case.forward(x, gamma, beta)
    dx, dgamma, dbeta = case.backward(dy, x, stats, gamma)
    assert_close(dx, numeric_grad(loss, x), 1e-6)
    assert_close(dgamma, numeric_grad(loss, gamma), 1e-6)
    if case.centred:
        assert_close(dbeta, numeric_grad(loss, beta), 1e-6)


@pytest.mark.parametrize("name", ["layer", "group", "instance"])
@each_dtype
def test_a_constant_group_gives_exactly_beta(name, dtype, rng):
    case = OPS[name]
    _, _, gamma, beta = _data(rng, case, dtype)
    x = np.full(case.shape, 1e7 + 1, dtype)
    y, stats = case.forward(x, gamma, beta)
    scale = reference._affine(case.kind, x.shape, case.groups, case.normalized_ndim, gamma,
                              beta)
    expected = scale[2].reshape(x.shape).astype(dtype)  # beta at every element
    assert y.tobytes() == expected.tobytes()
    assert np.all(stats.mean == np.float64(dtype(1e7 + 1)))


@pytest.mark.parametrize("name", ["layer", "rms", "group", "instance"])
def test_a_large_common_offset_loses_nothing(name, rng):
    """float64 data 1e8 + noise: the statistics are taken about a value of the data, so fastbn
    normalizes as if the offset were not there (the reference on x − 1e8, an exact shift)."""
    case = OPS[name]
    noise = rng.standard_normal(case.shape)
    x = 1e8 + noise  # x − 1e8 is exact (Sterbenz)
    y, stats = case.forward(x)
    if case.centred:
        ref_y = case.reference(x - 1e8)[0]
        assert_close(y, ref_y, 1e-7)
        assert_close(stats.mean.reshape(-1) - 1e8, case.reference(x - 1e8)[1], 1e-7)
    else:  # no centring: nothing cancels, the reference on x itself
        assert_close(y, case.reference(x)[0], 1e-12)


def test_rms_norm_default_eps_is_the_dtype_machine_epsilon(rng):
    for dtype in DTYPES:
        x = (rng.standard_normal((3, 8)) * 1e-5).astype(dtype)
        _, stats = fastbn.rms_norm(x, 8)
        eps = np.finfo(dtype).eps
        ms = (x.astype(np.float64) ** 2).mean(axis=1)
        assert_close(stats.invstd, 1.0 / np.sqrt(ms + eps), 1e-12)


# -- instance norm's running statistics and eval ----------------------------------------------


@each_dtype
def test_instance_norm_running_statistics_and_eval(dtype, rng):
    case = OPS["instance"]
    x, dy, gamma, beta = _data(rng, case, dtype)
    n, c = x.shape[:2]
    spatial = x[0, 0].size
    rm = rng.uniform(-1, 1, c).astype(dtype)
    rv = rng.uniform(0.5, 2, c).astype(dtype)
    new_rm, new_rv = rm.copy(), rv.copy()
    y, stats = fastbn.instance_norm(x, gamma, beta, running_mean=new_rm, running_var=new_rv,
                                    momentum=0.3)
    _, mean, var, _ = case.reference(x, gamma, beta)
    # PyTorch's convention: every sample updates a copy of the running statistics, which are
    # then averaged over the batch (unbiased variance per instance).
    expected_rm = (0.7 * rm + 0.3 * mean.reshape(n, c)).mean(axis=0)
    expected_rv = (0.7 * rv + 0.3 * (var * spatial / (spatial - 1)).reshape(n, c)).mean(axis=0)
    assert_close(new_rm, expected_rm, tol_for(dtype))
    assert_close(new_rv, expected_rv, tol_for(dtype))
    # eval: the running statistics for every sample, not modified
    snapshot = Snapshot(rm=rm, rv=rv)
    y, stats = fastbn.instance_norm(x, gamma, beta, running_mean=rm, running_var=rv,
                                    training=False)
    snapshot.assert_unchanged()
    mean = np.repeat(rm[None].astype(np.float64), n, 0)
    invstd = 1.0 / np.sqrt(np.repeat(rv[None].astype(np.float64), n, 0) + 1e-5)
    assert_close(stats.mean, mean, 1e-12)
    assert_close(stats.invstd, invstd, 1e-12)
    ref_y = case.reference(x, gamma, beta, mean=mean.reshape(-1), invstd=invstd.reshape(-1))[0]
    assert_close(y, ref_y, tol_for(dtype))
    dx, dgamma, dbeta = fastbn.instance_norm_backward(dy, x, stats, gamma, training=False)
    ref = case.reference_backward(dy, x, mean.reshape(-1), invstd.reshape(-1), gamma,
                                  training=False)
    assert_close(dx, ref[0], tol_for(dtype))
    assert_close(dgamma, ref[1], tol_for(dtype))
    assert_close(dbeta, ref[2], tol_for(dtype))


# -- out, layouts, determinism ------------------------------------------------------------------


@each_case
def test_out_in_place_and_non_contiguous(case, rng):
    x, dy, gamma, beta = _data(rng, case, np.float64)
    y, stats = case.forward(x, gamma, beta)
    dx = case.backward(dy, x, stats, gamma)[0]
    in_place = x.copy()
    result, _ = case.forward(in_place, gamma, beta, out=in_place)
    assert result is in_place and in_place.tobytes() == y.tobytes()
    dx_into_dy = dy.copy()
    result = case.backward(dx_into_dy, x, stats, gamma, out=dx_into_dy)[0]
    assert result is dx_into_dy and dx_into_dy.tobytes() == dx.tobytes()
    fortran = np.asfortranarray(x)
    out = np.asfortranarray(np.empty_like(x))
    result, _ = case.forward(fortran, gamma, beta, out=out)
    assert result is out and np.array_equal(out, y)
    strided = np.stack([x, x], axis=-1)[..., 0]  # not contiguous
    assert np.array_equal(case.forward(strided, gamma, beta)[0], y)


@each_case
def test_same_bits_serial_parallel_streamed_and_twice(case, rng, monkeypatch):
    import fastbn.cpu
    x, dy, gamma, beta = _data(rng, case, np.float32)

    def run_all():
        y, stats = case.forward(x, gamma, beta)
        grads = case.backward(dy, x, stats, gamma)
        return [a for a in (y, stats.mean, stats.invstd, *grads) if a is not None]

    pooled = run_all()
    again = run_all()
    monkeypatch.setattr(fastbn.cpu, "STREAM_MIN", 0)  # every planar map with streaming stores
    monkeypatch.setattr(fastbn.cpu, "STREAM_RUN", 0)
    streamed = run_all()
    monkeypatch.setattr(fastbn.cpu, "PARALLEL_MIN", 10**12)
    alone = run_all()
    for a, b, c, d in zip(pooled, again, streamed, alone):
        assert a.tobytes() == b.tobytes() == c.tobytes() == d.tobytes()


@each_dtype
@each_case
def test_lean_and_full_paths_give_the_same_bits(case, dtype, rng):
    """The common call runs in one compiled call (the lean path); a list for gamma takes the full
    checks and the device steps: the same bits."""
    x, dy, gamma, beta = _data(rng, case, dtype)
    y, stats = case.forward(x, gamma, beta)
    full_y, full_stats = case.forward(x, gamma.tolist(), None if beta is None else beta.tolist())
    assert y.tobytes() == full_y.tobytes()
    assert stats.invstd.tobytes() == full_stats.invstd.tobytes()
    lean = case.backward(dy, x, stats, gamma)
    full = case.backward(dy, x, stats, gamma.tolist())
    for a, b in zip(lean, full):  # (the full path's gradients take the list's dtype, float64)
        assert a is None and b is None or a.tobytes() == b.astype(a.dtype).tobytes()


THREADS_SCRIPT = r"""
import hashlib
import numpy as np
import numba
import fastbn
print("threads", numba.get_num_threads())
rng = np.random.default_rng(7)
for shape, call, back in [
        ((300, 1100), lambda x, g, b: fastbn.layer_norm(x, 1100, g, b),
         lambda dy, x, s, g: fastbn.layer_norm_backward(dy, x, s, 1100, g)),
        ((300, 1100), lambda x, g, b: fastbn.rms_norm(x, 1100, g),
         lambda dy, x, s, g: fastbn.rms_norm_backward(dy, x, s, 1100, g)),
        ((16, 64, 20, 20), lambda x, g, b: fastbn.group_norm(x, 32, g, b),
         lambda dy, x, s, g: fastbn.group_norm_backward(dy, x, s, 32, g)),
        ((16, 64, 20, 20), lambda x, g, b: fastbn.instance_norm(x, g, b),
         lambda dy, x, s, g: fastbn.instance_norm_backward(dy, x, s, g))]:
    params = shape[-1] if len(shape) == 2 else shape[1]
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal(shape) * 3 + 40).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        g, b = rng.uniform(0.5, 2, params), rng.uniform(-1, 1, params)
        y, s = call(x, g, b)
        h = hashlib.sha256()
        for a in (y, s.invstd, *back(dy, x, s, g)) + (() if s.mean is None else (s.mean,)):
            h.update(np.ascontiguousarray(a).tobytes())
        print(shape, np.dtype(dtype).name, h.hexdigest())
"""


def test_bitwise_identical_across_thread_counts():
    def hashes(threads):
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
        out = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=600, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = out.stdout.strip().splitlines()
        assert lines[0] == f"threads {threads}" and len(lines) == 9
        return lines[1:]

    one = hashes(1)
    assert hashes(2) == one
    assert hashes(3) == one


# -- errors: clear, and nothing modified ---------------------------------------------------------


def _error_calls(x, dy, stats, out):
    g4 = np.ones(4)
    return [
        (ValueError, "normalized_shape", lambda: fastbn.layer_norm(x, (5, 4), out=out)),
        (ValueError, "normalized_shape", lambda: fastbn.layer_norm(x, (), out=out)),
        (TypeError, "normalized_shape", lambda: fastbn.layer_norm(x, 4.0, out=out)),
        (ValueError, "gamma must have shape (4, 5)",
         lambda: fastbn.layer_norm(x, (4, 5), g4, out=out)),
        (ValueError, "num_groups 4 must divide",
         lambda: fastbn.group_norm(x, 4, out=out)),
        (TypeError, "num_groups", lambda: fastbn.group_norm(x, True, out=out)),
        (ValueError, "num_groups", lambda: fastbn.group_norm(x, 0, out=out)),
        (ValueError, "gamma must have shape (6,)",
         lambda: fastbn.group_norm(x, 3, g4, out=out)),
        (ValueError, "at least 3 dimensions",
         lambda: fastbn.instance_norm(x[:, :, 0, 0], out=out[:, :, 0, 0])),
        (ValueError, "more than one spatial value",
         lambda: fastbn.instance_norm(x[:, :, :1, :1], out=out[:, :, :1, :1])),
        (ValueError, "go together",
         lambda: fastbn.instance_norm(x, running_mean=np.zeros(6), out=out)),
        (ValueError, "were not given", lambda: fastbn.instance_norm(x, training=False, out=out)),
        (ValueError, "running_mean must have shape", lambda: fastbn.instance_norm(
            x, running_mean=np.zeros(5), running_var=np.ones(5), out=out)),
        (ValueError, "eps", lambda: fastbn.layer_norm(x, 5, eps=0.0, out=out)),
        (ValueError, "eps", lambda: fastbn.rms_norm(x, 5, eps=-1.0, out=out)),
        (TypeError, "float32 or float64", lambda: fastbn.layer_norm(x.astype(np.float16), 5)),
        (TypeError, "cast it to float32 or float64 first (x.astype(np.float32))",
         lambda: fastbn.group_norm(x.astype(np.int64), 3, out=out)),
        (TypeError, "cast it to float32 or float64 first (dy.astype(x.dtype))",
         lambda: fastbn.layer_norm_backward(dy.astype(np.int32), x, stats, 5, out=out)),
        (ValueError, "out must have x's shape",
         lambda: fastbn.layer_norm(x, 5, out=out[:1])),
        (TypeError, "out must have x's dtype",
         lambda: fastbn.group_norm(x, 3, out=out.astype(np.float32))),
        (ValueError, "dy must have x's shape",
         lambda: fastbn.layer_norm_backward(dy[:1], x, stats, 5, out=out)),
        (TypeError, "dy must have x's dtype",
         lambda: fastbn.layer_norm_backward(dy.astype(np.float32), x, stats, 5, out=out)),
        (ValueError, "stats.mean must have shape",
         lambda: fastbn.layer_norm_backward(dy, x, (stats.mean[:1], stats.invstd), 5, out=out)),
        (ValueError, "stats.mean is None",
         lambda: fastbn.layer_norm_backward(dy, x, (None, stats.invstd), 5, out=out)),
        (ValueError, "stats.mean must be None",
         lambda: fastbn.rms_norm_backward(dy, x, stats, 5, out=out)),
        (TypeError, "stats must be", lambda: fastbn.group_norm_backward(dy, x, 3.0, 3, out=out)),
        (ValueError, "stats.mean must have shape (3, 3)",
         lambda: fastbn.group_norm_backward(dy, x, stats, 3, out=out)),
        (ValueError, "stats.invstd must have shape (3, 6, 4)", lambda: fastbn.layer_norm_backward(
            dy, x, (stats.mean, stats.invstd[:, :1]), 5, out=out)),
    ]


def test_errors_name_the_argument_and_modify_nothing(rng):
    x = rng.standard_normal((3, 6, 4, 5))
    dy = rng.standard_normal(x.shape)
    _, stats = fastbn.layer_norm(x, 5)
    out = np.zeros_like(x)
    for kind, words, call in _error_calls(x, dy, stats, out):
        snapshot = Snapshot(x=x, dy=dy, out=out, mean=stats.mean, invstd=stats.invstd)
        with pytest.raises(kind, match=re.escape(words)):
            call()
        snapshot.assert_unchanged()


def test_partly_overlapping_out_is_refused(rng):
    flat = rng.standard_normal(3 * 5 + 1)
    x = flat[:-1].reshape(3, 5)
    out = flat[1:].reshape(3, 5)
    snapshot = Snapshot(flat=flat)
    with pytest.raises(ValueError, match="partly overlaps x"):
        fastbn.layer_norm(x, 5, out=out)
    snapshot.assert_unchanged()


def test_read_only_x_or_dy_as_out_is_refused(rng):
    x = rng.standard_normal((4, 6, 5))
    x.flags.writeable = False
    dy = x.copy()
    dy.flags.writeable = False
    for case in (Norm("layer", x.shape, 5, "layer"), Norm("group", x.shape, 3, "group"),
                 Norm("instance", x.shape, None, "group"), Norm("rms", x.shape, 5, "layer")):
        _, stats = case.forward(x)
        with pytest.raises(ValueError, match="out is read-only"):
            case.forward(x, out=x)
        for out in (x, dy):
            with pytest.raises(ValueError, match="out is read-only"):
                case.backward(dy, x, stats, out=out)


def test_running_statistics_untouched_on_error(rng):
    x = rng.standard_normal((2, 3, 8))
    rm, rv = np.zeros(3), np.ones(3)
    snapshot = Snapshot(rm=rm, rv=rv)
    with pytest.raises(ValueError):
        fastbn.instance_norm(x, np.ones(4), running_mean=rm, running_var=rv)
    with pytest.raises(ValueError):
        fastbn.instance_norm(x, running_mean=rm, running_var=rv, out=np.empty((2, 3, 7)))
    snapshot.assert_unchanged()


# -- layers ---------------------------------------------------------------------------------------


LAYERS = [
    (lambda: fastbn.LayerNorm((5, 6)), "layer", (3, 4, 5, 6), (5, 6)),
    (lambda: fastbn.RMSNorm(6), "rms", (3, 4, 6), 6),
    (lambda: fastbn.GroupNorm(3, 6), "group", (4, 6, 5), 3),
    (lambda: fastbn.InstanceNorm2d(3, affine=True), "instance", (2, 3, 4, 5), None),
]


@pytest.mark.parametrize("make, name, shape, arg", LAYERS, ids=[entry[1] for entry in LAYERS])
def test_layer_matches_the_op(make, name, shape, arg, rng):
    layer = make()
    case = Norm(name, shape, arg, "layer" if name in ("layer", "rms") else "group")
    x, dy, _, _ = _data(rng, case, np.float32)
    for value in layer.params().values():
        value[...] = rng.uniform(0.5, 1.5, value.shape)
    gamma = layer.gamma
    beta = layer.beta if case.centred else None
    y = layer(x)
    expected, stats = case.forward(x, gamma, beta)
    assert y.tobytes() == expected.tobytes()
    dx = layer.backward(dy)
    ref_dx, ref_dgamma, ref_dbeta = case.backward(dy, x, stats, gamma)
    assert dx.tobytes() == ref_dx.tobytes()
    grads = layer.grads()
    assert grads["gamma"].tobytes() == ref_dgamma.tobytes()
    if case.centred:
        assert grads["beta"].tobytes() == ref_dbeta.tobytes()
    assert set(grads) == set(layer.params())
    state = layer.state_dict()
    other = make()
    other.load_state_dict(state)
    assert all(np.array_equal(state[k], v) for k, v in other.state_dict().items())
    broken = dict(state, weight=np.zeros(99))
    before = other.state_dict()
    with pytest.raises(ValueError, match="weight"):
        other.load_state_dict(broken)
    assert all(np.array_equal(before[k], v) for k, v in other.state_dict().items())


def test_layer_errors():
    with pytest.raises(ValueError, match="divisible"):
        fastbn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="normalized_shape"):
        fastbn.LayerNorm(())
    with pytest.raises(TypeError, match="dtype"):
        fastbn.RMSNorm(4, dtype=np.int32)
    with pytest.raises(ValueError, match="3 dimensions"):
        fastbn.InstanceNorm1d(3)(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="channels"):
        fastbn.GroupNorm(2, 4)(np.zeros((2, 6, 3)))
    with pytest.raises(RuntimeError, match="forward first"):
        fastbn.LayerNorm(3).backward(np.zeros((2, 3)))
    assert fastbn.LayerNorm(4, elementwise_affine=False).params() == {}
    assert set(fastbn.LayerNorm(4, bias=False).state_dict()) == {"weight"}


def _layer_state(layer):
    """What a failed call must leave as it was: the state, gradients and the remembered
    forward."""
    return ({k: v.copy() for k, v in layer.state_dict().items()},
            {k: v.copy() for k, v in layer.grads().items()}, layer._saved)


def _assert_layer_unchanged(layer, before):
    state, grads, saved = _layer_state(layer)
    assert state.keys() == before[0].keys() and grads.keys() == before[1].keys()
    assert all(np.array_equal(state[k], before[0][k]) for k in state)
    assert all(np.array_equal(grads[k], before[1][k]) for k in grads)
    assert saved is before[2]


def _stepped(layer, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    layer.backward(np.ones_like(layer(x)))
    return _layer_state(layer)


SHAPE_ERRORS = [
    (lambda: fastbn.LayerNorm(100), (4, 100), (64, 128),
     "LayerNorm(100) expects 100 features on x's last axis (normalized_shape (100,)), but x of "
     "shape (64, 128) has 128 there"),
    (lambda: fastbn.LayerNorm(100, elementwise_affine=False), (4, 100), (64, 128),
     "LayerNorm(100) expects 100 features on x's last axis (normalized_shape (100,)), but x of "
     "shape (64, 128) has 128 there"),
    (lambda: fastbn.LayerNorm((4, 100)), (2, 4, 100), (64, 128),
     "LayerNorm((4, 100)) expects x's last 2 axes to be (4, 100) (normalized_shape), but x of "
     "shape (64, 128) has (64, 128) there"),
    (lambda: fastbn.LayerNorm((4, 100)), (2, 4, 100), (100,),
     "LayerNorm((4, 100)) expects x's last 2 axes to be (4, 100) (normalized_shape), but x of "
     "shape (100,) has only 1 axis"),
    (lambda: fastbn.RMSNorm(100), (4, 100), (64, 128),
     "RMSNorm(100) expects 100 features on x's last axis (normalized_shape (100,)), but x of "
     "shape (64, 128) has 128 there"),
    (lambda: fastbn.RMSNorm(100, elementwise_affine=False), (4, 100), (64, 128),
     "RMSNorm(100) expects 100 features on x's last axis (normalized_shape (100,)), but x of "
     "shape (64, 128) has 128 there"),
    (lambda: fastbn.GroupNorm(4, 100), (4, 100), (64, 128),
     "GroupNorm(4, 100) expects 100 channels on axis 1, but x of shape (64, 128) has 128 there"),
    (lambda: fastbn.GroupNorm(4, 100, affine=False), (4, 100, 3), (64, 128, 3),
     "GroupNorm(4, 100) expects 100 channels on axis 1, but x of shape (64, 128, 3) has 128 "
     "there"),
    (lambda: fastbn.InstanceNorm1d(100, affine=True), (4, 100, 5), (4, 128, 5),
     "InstanceNorm1d(100) expects 100 features on axis 1, but x of shape (4, 128, 5) has 128 "
     "there"),
    (lambda: fastbn.InstanceNorm2d(100, track_running_stats=True), (4, 100, 5, 5),
     (4, 128, 5, 5), "InstanceNorm2d(100) expects 100 features on axis 1, but x of shape "
     "(4, 128, 5, 5) has 128 there"),
]


@pytest.mark.parametrize("make, good, bad, words", SHAPE_ERRORS,
                         ids=[entry[3].split(" expects")[0] + str(entry[2])
                              for entry in SHAPE_ERRORS])
def test_layer_shape_errors_name_the_layer_and_change_nothing(make, good, bad, words, rng):
    layer = make()
    before = _stepped(layer, good, rng)
    with pytest.raises(ValueError, match=re.escape(words) + "$"):
        layer(np.ones(bad, np.float32))
    _assert_layer_unchanged(layer, before)


@pytest.mark.parametrize("cls, shape", [(fastbn.InstanceNorm1d, (4, 3, 1)),
                                        (fastbn.InstanceNorm2d, (4, 3, 1, 1))])
def test_instance_norm_layer_one_spatial_value_suggests_eval(cls, shape, rng):
    layer = cls(3, affine=True, track_running_stats=True)
    before = _stepped(layer, (4, 3) + (5,) * (len(shape) - 2), rng)
    x = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=re.escape(
            f"{cls.__name__}(3) in training needs more than one spatial value per channel, but x "
            f"of shape {shape} has 1; to normalize with the running statistics instead, call the "
            f"layer's .eval() first")):
        layer(x)
    _assert_layer_unchanged(layer, before)
    assert layer.eval()(x).shape == shape  # as the message says


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_instance_norm_layer_one_spatial_value_without_running_statistics(training, rng):
    layer = fastbn.InstanceNorm1d(3)
    before = _stepped(layer, (4, 3, 5), rng)
    layer.train(training)
    with pytest.raises(ValueError, match=re.escape(
            "InstanceNorm1d(3) normalizes each channel of each sample with its own statistics, in "
            "eval mode too (it has no running statistics: track_running_stats=False), and needs "
            "more than one spatial value per channel, but x of shape (4, 3, 1) has 1")):
        layer(np.ones((4, 3, 1), np.float32))
    _assert_layer_unchanged(layer, before)


@pytest.mark.parametrize("make, shape", [(lambda: fastbn.LayerNorm(5), (4, 5)),
                                         (lambda: fastbn.RMSNorm(5), (4, 5)),
                                         (lambda: fastbn.GroupNorm(1, 5), (4, 5)),
                                         (lambda: fastbn.InstanceNorm1d(5), (4, 5, 3))])
def test_layer_integer_x_says_to_cast(make, shape, rng):
    layer = make()
    before = _stepped(layer, shape, rng)
    with pytest.raises(TypeError, match=re.escape(
            f"got dtype int64 (shape {shape}); cast it to float32 or float64 first "
            f"(x.astype(np.float32))")):
        layer(np.ones(shape, np.int64))
    _assert_layer_unchanged(layer, before)
    with pytest.raises(ValueError, match=re.escape(f"dy must have x's shape {shape}")):
        layer.backward(np.ones((4, 6), np.float32))
    _assert_layer_unchanged(layer, before)


def test_instance_norm_layer_modes(rng):
    layer = fastbn.InstanceNorm1d(3, track_running_stats=True)
    x = rng.standard_normal((4, 3, 10)).astype(np.float32)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    y_train = layer(x)
    assert not np.array_equal(layer.running_mean, rm)
    assert layer.num_batches_tracked == 0  # as PyTorch's InstanceNorm
    layer.eval()
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    y_eval = layer(x)
    assert np.array_equal(layer.running_mean, rm) and np.array_equal(layer.running_var, rv)
    assert not np.allclose(y_train, y_eval)
    layer.backward(np.ones_like(y_eval))
    without = fastbn.InstanceNorm1d(3).eval()  # no running statistics: instance statistics
    assert np.array_equal(without(x), fastbn.instance_norm(x)[0])


# -- PyTorch -------------------------------------------------------------------------------------


@each_dtype
@each_case
def test_matches_pytorch(case, dtype, rng):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    x, dy, gamma, beta = _data(rng, case, dtype)
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = None if beta is None else torch.tensor(beta, requires_grad=True)
    if case.name == "layer":
        yt = functional.layer_norm(xt, case.parameter_shape, gt, bt)
    elif case.name == "rms":
        yt = functional.rms_norm(xt, case.parameter_shape, gt)
    elif case.name == "group":
        yt = functional.group_norm(xt, case.arg, gt, bt)
    else:
        yt = functional.instance_norm(xt, weight=gt, bias=bt)
    yt.backward(torch.tensor(dy))
    y, stats = case.forward(x, gamma, beta)
    dx, dgamma, dbeta = case.backward(dy, x, stats, gamma)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert_close(y, yt.detach().numpy(), tol)
    assert_close(dx, xt.grad.numpy(), tol)
    assert_close(dgamma, gt.grad.numpy(), tol)
    if bt is not None:
        assert_close(dbeta, bt.grad.numpy(), tol)


def test_layers_load_pytorch_checkpoints_and_agree(rng):
    torch = pytest.importorskip("torch")
    pairs = [(torch.nn.LayerNorm((5, 6)), fastbn.LayerNorm((5, 6)), (3, 4, 5, 6)),
             (torch.nn.RMSNorm(6), fastbn.RMSNorm(6), (3, 4, 6)),
             (torch.nn.GroupNorm(3, 6), fastbn.GroupNorm(3, 6), (4, 6, 5)),
             (torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
              fastbn.InstanceNorm2d(3, affine=True, track_running_stats=True), (2, 3, 4, 5))]
    for theirs, ours, shape in pairs:
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.tensor(rng.uniform(0.5, 1.5, tuple(p.shape))))
        ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
        x = rng.standard_normal(shape).astype(np.float32)
        for mode in (True, False):
            theirs.train(mode)
            ours.train(mode)
            expected = theirs(torch.tensor(x)).detach().numpy()
            assert_close(ours(x), expected, 1e-4)
        for k, v in theirs.state_dict().items():
            assert_close(ours.state_dict()[k], v.numpy(), 1e-5)


# -- hypothesis ----------------------------------------------------------------------------------


@st.composite
def _random_cases(draw):
    name = draw(st.sampled_from(["layer", "rms", "group", "instance"]))
    ndim = draw(st.integers(3 if name == "instance" else 2, 5))
    shape = list(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    if name in ("layer", "rms"):
        k = draw(st.integers(1, ndim - 1))
        arg, kind = tuple(shape[ndim - k:]), "layer"
    elif name == "group":
        groups = draw(st.integers(1, 4))
        shape[1] *= groups
        arg, kind = groups, "group"
    else:
        arg, kind = None, "group"
        assume(np.prod(shape[2:]) > 1)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = 10.0 ** draw(st.floats(-3, 3))
    offset = draw(st.floats(-1e3, 1e3))  # in units of the spread
    return Norm(name, tuple(shape), arg, kind), dtype, scale, offset, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_random_cases())
def test_random_shapes_offsets_and_scales(drawn):
    case, dtype, scale, offset, seed = drawn
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal(case.shape) + offset) * scale).astype(dtype)
    dy = rng.standard_normal(case.shape).astype(dtype)
    gamma = rng.uniform(-2, 2, case.parameter_shape)
    beta = rng.uniform(-2, 2, case.parameter_shape) if case.centred else None
    tol = tol_for(dtype)
    y, stats = case.forward(x, gamma, beta)
    ref_y, ref_mean, _, ref_invstd = case.reference(x, gamma, beta)
    assert_close(y, ref_y, tol)
    assert_close(stats.invstd.reshape(-1), ref_invstd, tol)
    dx, dgamma, dbeta = case.backward(dy, x, stats, gamma)
    ref_dx, ref_dgamma, ref_dbeta = case.reference_backward(dy, x, ref_mean, ref_invstd, gamma)
    assert_close(dx, ref_dx, tol)
    assert_close(dgamma.reshape(-1), ref_dgamma, tol)
    if case.centred:
        assert_close(dbeta.reshape(-1), ref_dbeta, tol)
