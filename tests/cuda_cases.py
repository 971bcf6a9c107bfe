"""The GPU path, run by tests/test_cuda.py in a process of its own: on the GPU where one is
usable, else under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1).

Not collected by a plain ``pytest`` (the name does not start with ``test_``): the simulator must be
switched on before numba is imported. Under the simulator the block sizes are shrunk so that every
multi-block merge and the grid-level merge run on the tests' small shapes; a real GPU runs its
default ones. Each case compares the GPU with the float64 reference and with the CPU path.
"""
import numba
import numpy as np
import pytest
from numba import cuda

import fastbn
import fastbn.__main__
import fastbn.cuda
from fastbn.cases import LAYOUTS, OPS, host, on_device

import reference
from _util import (GPU_SMALL_BLOCKS, assert_close, each_dtype, each_layout, each_mode, make_case,
                   shrink_blocks, tol_for)


@pytest.fixture(autouse=True)
def small_gpu_blocks(request, monkeypatch):
    """Under the simulator, fastbn.cuda's block sizes shrunk to GPU_SMALL_BLOCKS (except in tests
    marked production_blocks)."""
    production = request.node.get_closest_marker("production_blocks") is not None
    if numba.config.ENABLE_CUDASIM and not production:
        shrink_blocks(monkeypatch, fastbn.cuda, GPU_SMALL_BLOCKS)


def is_device_array(a):
    return not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host")


def test_cuda_is_available():
    assert fastbn.cuda_available()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@each_dtype
@each_layout
def test_device_arrays_match_reference_and_cpu(layout, dtype, training, rng):
    shape, axis = layout.small, layout.axis
    x, dy, gamma, beta, rm, rv = make_case(rng, shape, axis, dtype, offset=rng.uniform(-5, 5))
    tol = tol_for(dtype)
    xd, dyd, gd, bd, rmd, rvd = on_device(x, dy, gamma, beta, rm, rv)
    y, stats = fastbn.forward(xd, gd, bd, axis=axis, training=training, running_mean=rmd,
                              running_var=rvd)
    assert is_device_array(y) and is_device_array(stats.mean)  # stays on the device
    ry, rmean, rinvstd, rrm, rrv = reference.forward(x, gamma, beta, axis, training, rm, rv)
    assert_close(host(y), ry, tol, "y")
    assert_close(host(stats.mean), rmean, tol, "mean")
    assert_close(host(stats.invstd), rinvstd, tol, "invstd")
    assert_close(host(rmd), rrm, tol, "running_mean (on the device, updated there)")
    assert_close(host(rvd), rrv, tol, "running_var")

    dx, dgamma, dbeta = fastbn.backward(dyd, xd, stats, gd, axis=axis, training=training)
    rdx, rdgamma, rdbeta = reference.backward(dy, x, rmean, rinvstd, gamma, axis, training)
    assert_close(host(dx), rdx, tol, "dx")
    assert_close(host(dgamma), rdgamma, tol, "dgamma")
    assert_close(host(dbeta), rdbeta, tol, "dbeta")

    cy, cstats = fastbn.forward(x, gamma, beta, axis=axis, training=training,
                                running_mean=rm.copy(), running_var=rv.copy())
    cdx = fastbn.backward(dy, x, cstats, gamma, axis=axis, training=training)[0]
    assert_close(host(y), cy, tol, "y against the CPU")
    assert_close(host(dx), cdx, tol, "dx against the CPU")


@each_layout
def test_device_cuda_with_numpy_arrays_returns_numpy(layout, rng):
    shape, axis = layout.small, layout.axis
    x, dy, gamma, beta, rm, rv = make_case(rng, shape, axis, np.float32)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv,
                              device="cuda")
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, axis=axis, device="cuda")
    for a in (y, stats.mean, stats.invstd, dx, dgamma, dbeta):
        assert isinstance(a, np.ndarray)
    ry, rmean, rinvstd, _, _ = reference.forward(x, gamma, beta, axis)
    assert_close(y, ry, tol_for(np.float32), "y")
    assert_close(dx, reference.backward(dy, x, rmean, rinvstd, gamma, axis)[0],
                 tol_for(np.float32), "dx")
    assert dgamma.dtype == gamma.dtype


def test_device_cuda_copies_a_non_contiguous_host_array(rng):
    x = make_case(rng, (6, 5, 4, 3), 1, np.float64)[0]
    view = x.transpose(0, 3, 1, 2)[:, :, ::2]  # gaps and a permutation
    y, _ = fastbn.forward(view, axis=2, device="cuda")
    assert_close(y, reference.forward(np.ascontiguousarray(view), axis=2)[0], 1e-10, "y")


def test_large_offset_and_constant_channel(rng):
    shape, axis = (3, 4, 25), 1
    x, _, gamma, beta, _, _ = make_case(rng, shape, axis, np.float64,
                                        offset=1e8 + rng.uniform(-100, 100, 4), scale=1.0)
    x[:, 0] = 1e7 + 1.0
    y, stats = fastbn.forward(cuda.to_device(x), gamma, beta)
    ry, _, rinvstd, _, _ = reference.forward(x, gamma, beta, axis)
    assert np.all(host(y)[:, 0] == beta[0]), "a constant channel gives exactly beta"
    assert_close(host(y)[:, 1:], ry[:, 1:], 1e-10, "y")
    assert_close(host(stats.invstd)[1:], rinvstd[1:], 1e-10, "invstd")


def test_nan_spoils_only_its_channel(rng):
    x, dy, gamma, beta, _, _ = make_case(rng, (4, 3, 10), 1, np.float32)
    x[1, 0, 3] = np.nan
    y, stats = fastbn.forward(cuda.to_device(x), gamma, beta)
    dx = host(fastbn.backward(cuda.to_device(dy), cuda.to_device(x), stats, gamma)[0])
    assert np.isnan(host(y)[:, 0]).all() and np.isnan(dx[:, 0]).all()
    assert np.isfinite(host(y)[:, 1:]).all() and np.isfinite(dx[:, 1:]).all()


def test_out_and_in_place(rng):
    x, dy, gamma, beta, _, _ = make_case(rng, (5, 6, 7), 1, np.float32)
    ry = reference.forward(x, gamma, beta, 1)[0]
    xd = cuda.to_device(x)
    out = cuda.device_array_like(xd)
    y, _ = fastbn.forward(xd, gamma, beta, out=out)
    assert y is out
    assert_close(host(out), ry, tol_for(np.float32), "out")
    y, _ = fastbn.forward(xd, gamma, beta, out=xd)
    assert_close(host(xd), ry, tol_for(np.float32), "in place")


def test_host_running_statistics_are_updated_on_the_host(rng):
    x, _, gamma, beta, rm, rv = make_case(rng, (6, 3, 8), 1, np.float64)
    expected = reference.forward(x, gamma, beta, 1, True, rm, rv)[3:]
    fastbn.forward(cuda.to_device(x), gamma, beta, running_mean=rm, running_var=rv)
    assert_close(rm, expected[0], 1e-10, "running_mean")
    assert_close(rv, expected[1], 1e-10, "running_var")


def test_repeated_calls_are_bitwise_identical(rng):
    x, dy, gamma, beta, _, _ = make_case(rng, (9, 5, 12), 1, np.float32)
    xd, dyd = on_device(x, dy)
    first = [host(a) for a in (*fastbn.forward(xd, gamma, beta)[1],
                                *fastbn.backward(dyd, xd, fastbn.forward(xd, gamma, beta)[1]))]
    second = [host(a) for a in (*fastbn.forward(xd, gamma, beta)[1],
                                 *fastbn.backward(dyd, xd, fastbn.forward(xd, gamma, beta)[1]))]
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()


def test_environment_variable_sets_the_default(rng, monkeypatch):
    x = make_case(rng, (4, 3), 1, np.float32)[0]
    monkeypatch.setenv("FASTBN_DEVICE", "cuda")
    y, _ = fastbn.forward(x)  # NumPy in, computed on the GPU, NumPy out
    assert isinstance(y, np.ndarray)
    assert_close(y, reference.forward(x)[0], tol_for(np.float32), "y")
    monkeypatch.setenv("FASTBN_DEVICE", "gpu")
    with pytest.raises(ValueError, match="FASTBN_DEVICE"):
        fastbn.forward(x)


def test_errors(rng):
    x = make_case(rng, (4, 3, 5), 1, np.float32)[0]
    xd = cuda.to_device(x)
    with pytest.raises(TypeError, match="device='cpu'"):
        fastbn.forward(xd, device="cpu")
    with pytest.raises(TypeError, match="gamma is a CUDA array"):
        fastbn.forward(x, cuda.to_device(np.ones(3)))
    with pytest.raises(ValueError, match="C-contiguous"):
        fastbn.forward(cuda.to_device(np.asfortranarray(x)))
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\)"):
        fastbn.forward(xd, cuda.to_device(np.ones(4)))
    rm = cuda.to_device(np.zeros(3))
    with pytest.raises(ValueError, match="running_mean and running_var go together"):
        fastbn.forward(xd, running_mean=rm)
    rv = np.ones(3)
    out = cuda.device_array_like(xd)
    with pytest.raises(TypeError, match="same place"):
        fastbn.forward(xd, running_mean=rm, running_var=rv, out=out)
    assert np.all(host(rm) == 0) and np.all(rv == 1)
    stats = fastbn.forward(xd)[1]
    with pytest.raises(TypeError, match="float32 or float64"):
        fastbn.backward(xd, xd, stats, np.ones(3, np.longdouble), out=out)


def _bad_calls(rng):
    """(name, error, regex, call) for the CPU suite's error matrix, made of device arrays."""
    x, dy, gamma, beta, rm, rv = make_case(rng, (4, 3, 5), 1, np.float32)
    xd, dyd, rmd, rvd = on_device(x, dy, rm, rv)
    out = cuda.device_array_like(xd)
    stats = fastbn.BatchStats(*on_device(rng.uniform(-1, 1, 3), rng.uniform(0.5, 2, 3)))
    buffer = cuda.to_device(np.zeros(2 * x.size, np.float32))
    shifted = buffer[7:7 + x.size].reshape(x.shape)  # overlaps buffer[:x.size] in part
    return [
        ("ndim", ValueError, r"\bx\b.*dimensions", lambda: fastbn.forward(cuda.to_device(
            np.ones(5, np.float32)))),
        ("axis", ValueError, "axis 3", lambda: fastbn.forward(xd, axis=3)),
        ("gamma shape", ValueError, "gamma", lambda: fastbn.forward(xd, cuda.to_device(
            np.ones(4)))),
        ("int x", TypeError, r"\bx\b", lambda: fastbn.forward(cuda.to_device(
            np.ones((4, 3), np.int32)))),
        ("float16 x", TypeError, "float16", lambda: fastbn.forward(cuda.to_device(
            np.ones((4, 3), np.float16)))),
        ("empty batch", ValueError, "training", lambda: fastbn.forward(cuda.to_device(
            np.ones((0, 3), np.float32)))),
        ("one value", ValueError, "training", lambda: fastbn.forward(cuda.to_device(
            np.ones((1, 3), np.float32)))),
        ("eps", ValueError, "eps", lambda: fastbn.forward(xd, eps=0.0)),
        ("momentum", ValueError, "momentum", lambda: fastbn.forward(
            xd, running_mean=rmd, running_var=rvd, momentum=1.5)),
        ("running shape", ValueError, "running_var", lambda: fastbn.forward(
            xd, running_mean=rmd, running_var=cuda.to_device(np.ones(4)))),
        ("out shape", ValueError, "out", lambda: fastbn.forward(
            xd, running_mean=rmd, running_var=rvd, out=cuda.device_array((4, 3, 6), np.float32))),
        ("out dtype", TypeError, "out", lambda: fastbn.forward(
            xd, running_mean=rmd, running_var=rvd, out=cuda.device_array_like(
                cuda.to_device(x.astype(np.float64))))),
        ("out overlaps x", ValueError, "overlap", lambda: fastbn.forward(
            buffer[:x.size].reshape(x.shape), running_mean=rmd, running_var=rvd, out=shifted)),
        ("dy shape", ValueError, "dy", lambda: fastbn.backward(
            cuda.to_device(dy[:, :, :4].copy()), xd, stats, out=out)),
        ("dy not contiguous", ValueError, "dy .*C-contiguous", lambda: fastbn.backward(
            cuda.to_device(np.asfortranarray(dy)), xd, stats, out=out)),
        ("stats of another C", ValueError, "mean|invstd", lambda: fastbn.backward(
            dyd, xd, fastbn.BatchStats(*on_device(np.zeros(4), np.ones(4))), out=out)),
    ], [xd, dyd, rmd, rvd, out, buffer, stats.mean, stats.invstd]


def test_error_matrix_leaves_device_arrays_unchanged(rng):
    calls, arrays = _bad_calls(rng)
    before = [host(a).tobytes() for a in arrays]
    for name, error, regex, call in calls:
        with pytest.raises(error, match=regex):
            call()
        assert [host(a).tobytes() for a in arrays] == before, f"{name} modified an argument"


@each_layout
def test_moments_and_normalize_match_the_cpu(layout, rng):
    shape, axis = layout.small, layout.axis
    x, _, gamma, beta, rm, rv = make_case(rng, shape, axis, np.float32)
    xd, rmd, rvd = on_device(x, rm, rv)
    got = fastbn.moments(xd, axis=axis)
    for a, b in zip(got, fastbn.moments(x, axis=axis)):
        assert isinstance(a, np.ndarray)
        assert_close(a, b, 1e-12)
    total = fastbn.merge_moments(got, fastbn.moments(x[:2], axis=axis))
    y, stats = fastbn.normalize(xd, total, gamma, beta, axis=axis, running_mean=rmd,
                                running_var=rvd)
    ry, rstats = fastbn.normalize(x, total, gamma, beta, axis=axis, running_mean=rm,
                                  running_var=rv)
    assert is_device_array(y) and is_device_array(stats.mean)
    assert_close(host(y), ry, tol_for(np.float32), "y")
    assert_close(host(stats.invstd), rstats.invstd, 1e-12, "invstd")
    assert_close(host(rmd), rm, 1e-12, "running_mean")
    assert_close(host(rvd), rv, 1e-12, "running_var")


def test_python_m_fastbn_checks_and_times_the_gpu(monkeypatch, capsys):
    """``python -m fastbn --device cuda``, on a small shape (the simulator is slow)."""
    layout = next(layout._replace(large=layout.small) for layout in LAYOUTS
                  if layout.name == "NCHW")
    monkeypatch.setattr(fastbn.__main__, "LAYOUTS", [layout])
    assert fastbn.__main__.main(["--device", "cuda", "--bench", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    shape = "x".join(map(str, layout.small))
    assert "ok" in out and "FAILED" not in out, out
    for op in OPS:
        assert f"| NCHW | {shape} | {op.name} |" in out, out
    assert "n/a on the GPU" in out, out


# -- the fused residual add and ReLU (docs/design.md §1): the steps, and the public API ----------
#
# The reference is tests/reference.py's plain BN in float64, then ``+ residual`` and
# ``max(·, 0)``; backward masks dy with the forward's y > 0 and runs the plain reference
# backward on it, whose masked dy is dresidual's. Small shapes: a planar view (several chunks of
# a channel at GPU_SMALL_BLOCKS), channels-last and N×D (several segments and column blocks).

PLANAR, CHANNELS_LAST, NXD = ((4, 3, 10), 1), ((3, 4, 5, 4), -1), ((30, 5), 1)
# The simulator is slow: each layout and dtype at least once, not every pair.
FUSED_CASES = {"planar-f32": (*PLANAR, np.float32), "planar-f64": (*PLANAR, np.float64),
               "channels-last-f32": (*CHANNELS_LAST, np.float32),
               "NxD-f64": (*NXD, np.float64)}
each_fused_case = pytest.mark.parametrize("shape, axis, dtype", list(FUSED_CASES.values()),
                                          ids=list(FUSED_CASES))
some_fused_cases = pytest.mark.parametrize(
    "shape, axis, dtype", [(*PLANAR, np.float32), (*CHANNELS_LAST, np.float64)],
    ids=["planar-f32", "channels-last-f64"])
# (residual, relu, dresidual): dresidual None, "new" (an array of its own) or "dy" (dy itself)
FUSIONS = {"residual": (True, False, "new"), "relu": (False, True, None),
           "both": (True, True, "new"), "both, dresidual is dy": (True, True, "dy")}
each_fusion = pytest.mark.parametrize("fusion", list(FUSIONS.values()), ids=list(FUSIONS))
EPS = 1e-5


def fused_case(rng, shape, axis, dtype):
    """x, dy, gamma, beta, running_mean, running_var, residual: about half of each channel's
    pre-activations below zero, so that the ReLU and its mask cut."""
    x, dy, gamma, beta, rm, rv = make_case(rng, shape, axis, dtype)
    residual = rng.uniform(-1.5, 1.5, shape).astype(dtype)
    return x, dy, gamma, beta, rm, rv, residual


def reference_fused_forward(x, gamma, beta, axis, training, rm, rv, residual, relu):
    y, mean, invstd, _, _ = reference.forward(x, gamma, beta, axis, training, rm, rv)
    if residual is not None:
        y = y + residual.astype(np.float64)
    return (np.maximum(y, 0.0) if relu else y), mean, invstd


def reference_fused_backward(dy, x, mean, invstd, gamma, axis, training, y):
    """``(dx, dgamma, dbeta, dresidual)``: the plain reference backward of dy masked by y > 0
    (dy itself without y)."""
    g = dy.astype(np.float64) if y is None else np.where(y > 0, dy.astype(np.float64), 0.0)
    return (*reference.backward(g, x, mean, invstd, gamma, axis, training), g)


class StepsCall:
    """One call's fastbn.cuda.Steps on host arrays laid out like ``x``: device copies viewed
    ``(outer, C, inner)``, as the API layer makes them."""

    def __init__(self, x, axis):
        self.steps = fastbn.cuda.Steps()
        self.view = self.steps.view(x, axis % x.ndim)
        self.channels = x.shape[axis]
        self.shape, self.dtype = x.shape, x.dtype

    def operands(self, *arrays):
        """Device ``(outer, C, inner)`` copies (None stays None)."""
        return [None if a is None else self.steps.operands(self.view, a)[0] for a in arrays]

    def empty(self):
        return cuda.device_array(self.shape, self.dtype).reshape(self.view.shape)

    def vector(self, values, fill=None):
        return self.steps.per_channel(values, self.channels, fill)

    def forward(self, x3, gamma, beta, training, rm, rv, **fused):
        """``(y3, mean, invstd)`` of the training or eval forward; ``fused``: the steps'
        residual3 and relu."""
        steps, y3 = self.steps, self.empty()
        g, b = self.vector(gamma, 1.0), self.vector(beta, 0.0)
        if training:
            shift, delta, m2 = steps.moments(x3)
            mean, _, invstd = steps.forward_map(x3, y3, shift, delta, m2, g, b, EPS, **fused)
        else:
            mean = self.vector(rm)
            invstd = steps.normalize_with(x3, y3, mean, self.vector(rv), g, b, EPS, **fused)
        return y3, mean, invstd

    def backward(self, dy3, x3, mean, invstd, gamma, training, y3=None, dresidual3=None):
        """``(dx3, sum_dy, sum_dy_xmu, dgamma, dbeta)`` on the device; the masked steps with
        ``y3``, dresidual written into ``dresidual3`` if given."""
        steps, dx3 = self.steps, self.empty()
        mean, invstd = self.vector(mean), self.vector(invstd)
        sums = steps.gradient_sums(dy3, x3, mean, **({} if y3 is None else {"y3": y3}))
        extra = {name: a for name, a in (("y3", y3), ("dresidual3", dresidual3)) if a is not None}
        count = x3.shape[0] * x3.shape[2]
        steps.backward_map(dy3, x3, dx3, mean, invstd, self.vector(gamma, 1.0), *sums, count,
                           training, **extra)
        return (dx3, *sums, *steps.parameter_gradients(*sums, invstd, np.float64))

    def host(self, a3):
        """A device ``(outer, C, inner)`` result as a host array of x's shape."""
        return host(a3).reshape(self.shape)


@each_fusion
@each_mode
@each_fused_case
def test_fused_steps_match_the_reference(shape, axis, dtype, training, fusion, rng):
    """forward_map / normalize_with with residual3 and relu, gradient_sums and backward_map with
    the ReLU's y3 and dresidual3 (a new array or dy3 itself), against the float64 reference."""
    with_residual, relu, dresidual = fusion
    x, dy, gamma, beta, rm, rv, residual = fused_case(rng, shape, axis, dtype)
    residual = residual if with_residual else None
    tol = tol_for(dtype)
    call = StepsCall(x, axis)
    x3, dy3, residual3 = call.operands(x, dy, residual)
    y3, mean, invstd = call.forward(x3, gamma, beta, training, rm, rv, residual3=residual3,
                                    relu=relu)
    y = call.host(y3)
    ry, rmean, rinvstd = reference_fused_forward(x, gamma, beta, axis, training, rm, rv, residual,
                                                 relu)
    assert_close(y, ry, tol, "y")
    assert_close(host(mean), rmean, tol, "mean")
    assert_close(host(invstd), rinvstd, tol, "invstd")
    if relu:
        assert (y < 0).sum() == 0 and 0 < (y == 0).sum() < y.size, "the ReLU cuts some, not all"

    dresidual3 = {"new": call.empty(), "dy": dy3, None: None}[dresidual]
    dx3, sum_dy, _, dgamma, dbeta = call.backward(
        dy3, x3, mean, invstd, gamma, training, y3=y3 if relu else None, dresidual3=dresidual3)
    rdx, rdgamma, rdbeta, rdresidual = reference_fused_backward(
        dy, x, host(mean), host(invstd), gamma, axis, training, y if relu else None)
    assert_close(call.host(dx3), rdx, tol, "dx")
    assert_close(host(dgamma), rdgamma, tol, "dgamma")
    assert_close(host(dbeta), rdbeta, tol, "dbeta")
    assert_close(host(sum_dy), rdbeta, tol, "the sums: Σg")
    if dresidual is not None:
        got = call.host(dresidual3)
        assert got.dtype == dy.dtype
        assert got.tobytes() == rdresidual.astype(dtype).tobytes(), "dresidual: dy, masked"
    if dresidual != "dy":
        assert call.host(dy3).tobytes() == dy.tobytes(), "dy is read, never written"
    assert call.host(y3).tobytes() == y.tobytes(), "y is read, never written"


def _launched(monkeypatch):
    """The kernels fastbn.cuda launches from now on, as a list."""
    kernels, configured = [], fastbn.cuda._launcher

    def launcher(kernel, grid, block, stream):
        kernels.append(kernel)
        return configured(kernel, grid, block, stream)
    monkeypatch.setattr(fastbn.cuda, "_launcher", launcher)
    return kernels


def _name(kernel):
    """The name of a kernel's Python function (a real dispatcher's or the simulator's)."""
    return getattr(kernel, "py_func", getattr(kernel, "fn", None)).__name__


FUSED_KERNELS = {"fused_kernel", "planar_masked_grad_sums", "rows_masked_grad_sums"}


@each_mode
@some_fused_cases
def test_steps_without_fusion_run_the_plain_kernels(shape, axis, dtype, training, rng,
                                                    monkeypatch):
    """residual3=None, relu=False, y3=None, dresidual3=None spelled out: the plain kernels run,
    none of the fused ones, with the bits of the calls that leave them out."""
    x, dy, gamma, beta, rm, rv, _ = fused_case(rng, shape, axis, dtype)
    launched = _launched(monkeypatch)
    results = []
    for fused in ({}, {"residual3": None, "relu": False}):
        call = StepsCall(x, axis)
        x3, dy3 = call.operands(x, dy)
        y3, mean, invstd = call.forward(x3, gamma, beta, training, rm, rv, **fused)
        dx3, *sums = (call.backward(dy3, x3, host(mean), host(invstd), gamma, training)
                      if not fused else call.backward(dy3, x3, host(mean), host(invstd), gamma,
                                                      training, y3=None, dresidual3=None))
        results.append([call.host(y3).tobytes(), call.host(dx3).tobytes(),
                        *(host(a).tobytes() for a in (mean, invstd, *sums))])
    assert results[0] == results[1]
    ran = [_name(kernel) for kernel in launched]
    assert not FUSED_KERNELS & set(ran), f"a fused kernel ran: {ran}"
    planar = call.view.shape[2] > 1
    assert ran.count("kernel") == 4, ran  # the forward and backward plain maps, twice
    assert ran.count("planar_grad_sums" if planar else "rows_grad_sums") == 2, ran
    assert (launched.count(fastbn.cuda._grad_map) == 2) == training


@each_mode
@some_fused_cases
def test_fused_kernels_keep_the_plain_bits(shape, axis, dtype, training, rng, monkeypatch):
    """Each fused kernel computes the plain map's expression: the ReLU alone gives the plain y
    where it is not < 0; a residual of zeros gives plain y + 0; a mask of all ones gives the
    plain sums and dx bit for bit, with dy itself into dresidual; dresidual alone leaves dx and
    the sums as they are."""
    x, dy, gamma, beta, rm, rv, _ = fused_case(rng, shape, axis, dtype)
    launched = _launched(monkeypatch)
    call = StepsCall(x, axis)
    x3, dy3, zeros3, ones3 = call.operands(x, dy, np.zeros_like(x), np.ones_like(x))
    plain_y3, mean, invstd = call.forward(x3, gamma, beta, training, rm, rv)
    plain = call.host(plain_y3)
    relu = call.host(call.forward(x3, gamma, beta, training, rm, rv, relu=True)[0])
    assert relu.tobytes() == np.where(plain < 0, 0, plain).astype(dtype).tobytes()
    added = call.host(call.forward(x3, gamma, beta, training, rm, rv, residual3=zeros3)[0])
    assert added.tobytes() == (plain + dtype(0)).tobytes()

    mean, invstd = host(mean), host(invstd)
    expected = [host(a).tobytes() for a in call.backward(dy3, x3, mean, invstd, gamma, training)]
    for fused in ({"y3": ones3}, {"dresidual3": call.empty()}, {"y3": ones3,
                                                                 "dresidual3": call.empty()}):
        got = call.backward(dy3, x3, mean, invstd, gamma, training, **fused)
        assert [host(a).tobytes() for a in got] == expected, sorted(fused)
        if "dresidual3" in fused:
            assert call.host(fused["dresidual3"]).tobytes() == dy.tobytes()
    ran = [_name(kernel) for kernel in launched]
    assert ran.count("fused_kernel") == 5, ran  # 2 forward maps, 3 backward maps
    assert ran.count("planar_masked_grad_sums") + ran.count("rows_masked_grad_sums") == 2, ran


@each_mode
def test_fused_nan_passes_the_relu_and_the_mask_drops_it(training, rng):
    """As PyTorch: NaN passes the ReLU (it is not < 0); a NaN in dy where y <= 0 is dropped by
    the mask (threshold_backward), so dx and dresidual stay finite there."""
    shape, axis = (4, 3, 10), 1
    x, dy, gamma, beta, rm, rv, residual = fused_case(rng, shape, axis, np.float32)
    residual[0, 1, 2] = np.nan
    call = StepsCall(x, axis)
    x3, residual3 = call.operands(x, residual)
    y3, mean, invstd = call.forward(x3, gamma, beta, training, rm, rv, residual3=residual3,
                                    relu=True)
    y = call.host(y3)
    assert np.isnan(y[0, 1, 2]) and np.isnan(y).sum() == 1
    y[0, 1, 2] = -1.0  # a y the mask drops, under a NaN dy
    dy[y <= 0] = np.nan
    dy3, y3 = call.operands(dy, y)
    dresidual3 = call.empty()
    dx3, *_ = call.backward(dy3, x3, host(mean), host(invstd), gamma, training, y3=y3,
                            dresidual3=dresidual3)
    dx = call.host(dx3)
    rdx = reference_fused_backward(dy, x, host(mean), host(invstd), gamma, axis, training, y)[0]
    assert np.isfinite(dx).all()
    assert_close(dx, rdx, tol_for(np.float32), "dx")
    assert (call.host(dresidual3)[y <= 0] == 0).all()


@each_fusion
@pytest.mark.parametrize("shape, axis, training", [(*PLANAR, True), (*CHANNELS_LAST, False)],
                         ids=["planar-train", "channels-last-eval"])
def test_fused_api_on_device_arrays(shape, axis, training, fusion, rng):
    """fastbn.forward(..., residual=, activation="relu") and fastbn.backward(..., y=,
    dresidual=) on CUDA arrays: results stay on the device, match the reference and the CPU."""
    with_residual, relu, dresidual = fusion
    dtype = np.float32
    x, dy, gamma, beta, rm, rv, residual = fused_case(rng, shape, axis, dtype)
    residual = residual if with_residual else None
    activation = "relu" if relu else None
    tol = tol_for(dtype)
    xd, dyd, rmd, rvd = on_device(x, dy, rm, rv)
    rd = None if residual is None else cuda.to_device(residual)
    y, stats = fastbn.forward(xd, gamma, beta, axis=axis, training=training, running_mean=rmd,
                              running_var=rvd, residual=rd, activation=activation)
    assert is_device_array(y)
    ry, rmean, rinvstd = reference_fused_forward(x, gamma, beta, axis, training, rm, rv,
                                                 residual, relu)
    assert_close(host(y), ry, tol, "y")
    dres = {"new": cuda.device_array_like(dyd), "dy": dyd, None: None}[dresidual]
    dx, dgamma, dbeta = fastbn.backward(dyd, xd, stats, gamma, axis=axis, training=training,
                                        activation=activation, y=y if relu else None,
                                        dresidual=dres)
    assert is_device_array(dx)
    rdx, rdgamma, rdbeta, rdres = reference_fused_backward(
        dy, x, rmean, rinvstd, gamma, axis, training, host(y) if relu else None)
    assert_close(host(dx), rdx, tol, "dx")
    assert_close(host(dgamma), rdgamma, tol, "dgamma")
    assert_close(host(dbeta), rdbeta, tol, "dbeta")
    if dres is not None:
        assert host(dres).tobytes() == rdres.astype(dtype).tobytes(), "dresidual"

    cy, cstats = fastbn.forward(x, gamma, beta, axis=axis, training=training,
                                running_mean=rm.copy(), running_var=rv.copy(),
                                residual=residual, activation=activation)
    assert_close(host(y), cy, tol, "y against the CPU")
    cdx = fastbn.backward(dy, x, cstats, gamma, axis=axis, training=training,
                          activation=activation, y=cy if relu else None)[0]
    assert_close(host(dx), cdx, tol, "dx against the CPU")


@pytest.mark.parametrize("shape, axis, dtype", [(*PLANAR, np.float64),
                                               (*CHANNELS_LAST, np.float32)],
                         ids=["planar-f64", "channels-last-f32"])
def test_fused_api_device_cuda_with_numpy_arrays(shape, axis, dtype, rng):
    """device="cuda" with NumPy arrays: NumPy results, dresidual written on the host (also when
    it is dy itself)."""
    x, dy, gamma, beta, _, _, residual = fused_case(rng, shape, axis, dtype)
    tol = tol_for(dtype)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, residual=residual, activation="relu",
                              device="cuda")
    assert isinstance(y, np.ndarray)
    ry, rmean, rinvstd = reference_fused_forward(x, gamma, beta, axis, True, None, None,
                                                 residual, True)
    assert_close(y, ry, tol, "y")
    rdx, _, rdbeta, rdres = reference_fused_backward(dy, x, rmean, rinvstd, gamma, axis, True, y)
    for name, dresidual in (("new", np.empty_like(dy)), ("dy", dy.copy())):
        dy_in = dresidual if name == "dy" else dy
        dx, _, dbeta = fastbn.backward(dy_in, x, stats, gamma, axis=axis, activation="relu", y=y,
                                       dresidual=dresidual, device="cuda")
        assert isinstance(dx, np.ndarray)
        assert_close(dx, rdx, tol, f"dx, dresidual {name}")
        assert_close(dbeta, rdbeta, tol, f"dbeta, dresidual {name}")
        assert dresidual.tobytes() == rdres.astype(dtype).tobytes(), f"dresidual {name}"


def test_fused_layer_on_device_arrays(rng):
    """BatchNorm(activation="relu") on CUDA arrays: ``bn(x, residual)`` then ``bn.backward(dy)``
    gives ``(dx, dresidual)`` on the device, as the same layer on the CPU gives them."""
    shape, axis = CHANNELS_LAST
    x, dy, _, _, _, _, residual = fused_case(rng, shape, axis, np.float32)
    results = []
    for arrays in (on_device(x, residual, dy), (x, residual, dy)):
        bn = fastbn.BatchNorm(shape[axis], axis=axis, activation="relu")
        y = bn(arrays[0], arrays[1])
        dx, dresidual = bn.backward(arrays[2])
        results.append([y, dx, dresidual, bn.grads()["beta"], bn.running_var])
    assert all(map(is_device_array, results[0][:3]))
    tol = tol_for(np.float32)
    for name, gpu, cpu in zip(["y", "dx", "dresidual", "dbeta", "running_var"], *results):
        assert_close(host(gpu), cpu, tol, name)
    assert 0 < (results[1][0] == 0).sum() < x.size and (results[1][2] == 0).sum() > 0


# -- the normalization family's device steps (fastbn.cuda.Steps.group_*) ------------------------
#
# The steps called directly on device arrays viewed (R, P, S), against tests/reference.py's
# ``normalize`` / ``normalize_backward`` (float64). At GPU_SMALL_BLOCKS (8 threads, tiles of 2)
# the rows take several strides and tiles, short rows share a block (bands), and with
# ROW_BLOCKS = 2 the blocks stride down the rows; the column sums of the parameter gradients come
# in several segments (SEGMENT 5).

# name: (x's shape, reference kind, groups, normalized_ndim, centred); (R, P, S) follows
FAMILY = {
    "layer": ((5, 3, 40), "layer", 1, 1, True),  # (15, 40, 1)
    "layer-2d": ((4, 3, 5), "layer", 1, 2, True),  # (4, 15, 1)
    "group": ((3, 6, 4, 5), "group", 3, 1, True),  # (9, 2, 20)
    "group-flat": ((7, 8), "group", 4, 1, True),  # (28, 2, 1): a parameter per value, groups 4
    "instance": ((4, 5, 3), "instance", 5, 1, True),  # (20, 1, 3): short runs, bands of 4
    "instance-2d": ((2, 3, 6, 7), "instance", 3, 1, True),  # (6, 1, 42)
    "rms": ((6, 20), "layer", 1, 1, False),  # (6, 20, 1)
    "rms-2d": ((3, 4, 6), "layer", 1, 2, False),  # (3, 24, 1)
}
each_family_case = pytest.mark.parametrize("case", list(FAMILY.values()), ids=list(FAMILY))
CENTRED_FAMILY = {name: case for name, case in FAMILY.items() if case[4]}


@pytest.fixture
def strided_rows(monkeypatch):
    """Two blocks at most for the family's reductions: they stride down the rows."""
    if numba.config.ENABLE_CUDASIM:
        monkeypatch.setattr(fastbn.cuda, "ROW_BLOCKS", 2)


def family_view(shape, kind, groups, ndim):
    """``(R, P, S)`` of x's shape for the op."""
    if kind == "layer":
        return (int(np.prod(shape[:-ndim])), int(np.prod(shape[-ndim:])), 1)
    return (shape[0] * groups, shape[1] // groups, int(np.prod(shape[2:])))


class FamilyCall:
    """Device copies viewed (R, P, S), float64 device parameters, and the steps of one call."""

    def __init__(self, rng, case, dtype, offset=None):
        shape, self.kind, self.groups, self.ndim, self.centred = case
        self.view = family_view(shape, self.kind, self.groups, self.ndim)
        self.shape, self.dtype = shape, dtype
        parameters = self.groups * self.view[1]
        offset = rng.uniform(-5, 5) if offset is None else offset
        self.x = (rng.standard_normal(shape) * rng.uniform(0.5, 2) + offset).astype(dtype)
        self.dy = rng.standard_normal(shape).astype(dtype)
        self.gamma = rng.uniform(0.5, 2.0, parameters) * rng.choice([-1.0, 1.0], parameters)
        self.beta = rng.uniform(-1.0, 1.0, parameters)
        self.steps = fastbn.cuda.Steps()

    def device(self, a):
        return cuda.to_device(np.ascontiguousarray(a)).reshape(self.view)

    def empty(self):
        return cuda.device_array(self.view, self.dtype)

    def params(self):
        """gamma and beta in the reference's shape: (C,), or normalized_shape for layer norm."""
        if self.kind == "layer":
            shape = self.shape[-self.ndim:]
            return self.gamma.reshape(shape), self.beta.reshape(shape)
        return self.gamma, self.beta

    def forward(self, x3=None):
        """``(y3, mean, var, invstd)`` of group_forward."""
        y3 = self.empty()
        stats = self.steps.group_forward(self.device(self.x) if x3 is None else x3, y3,
                                         self.groups, cuda.to_device(self.gamma),
                                         cuda.to_device(self.beta), EPS, self.centred)
        return (y3, *stats)

    def backward(self, mean, invstd, training, with_dx=True):
        """``(dx3, dgamma, dbeta)`` of group_backward (dx3 None without ``with_dx``)."""
        dx3 = self.empty() if with_dx else None
        grads = self.steps.group_backward(self.device(self.dy), self.device(self.x), dx3,
                                          self.groups, mean, invstd,
                                          cuda.to_device(self.gamma), training)
        return (dx3, *grads)

    def reference(self, **given):
        gamma, beta = self.params()
        return reference.normalize(self.x, self.kind, EPS, gamma, beta if self.centred else None,
                                   self.groups, self.ndim, self.centred, **given)

    def reference_backward(self, mean, invstd, training):
        return reference.normalize_backward(self.dy, self.x, mean, invstd, self.kind,
                                            self.params()[0], self.groups, self.ndim, training)

    def host(self, a3):
        return host(a3).reshape(self.shape)


@pytest.mark.usefixtures("strided_rows")
@each_mode
@each_dtype
@each_family_case
def test_family_steps_match_the_reference(case, dtype, training, rng):
    """group_forward (mean, biased variance or mean square, invstd, y) and group_backward
    (dx in training and eval, dgamma, dbeta) against the float64 reference."""
    call = FamilyCall(rng, case, dtype)
    tol = tol_for(dtype)
    y3, mean, var, invstd = call.forward()
    ry, rmean, rvar, rinvstd = call.reference()
    y = call.host(y3)
    assert y.dtype == dtype
    assert_close(y, ry, tol, "y")
    if call.centred:
        assert_close(host(mean), rmean, tol, "mean")
    else:
        assert mean is None
    assert_close(host(var), rvar, tol, "var")
    assert_close(host(invstd), rinvstd, tol, "invstd")

    dx3, dgamma, dbeta = call.backward(mean, invstd, training)
    rdx, rdgamma, rdbeta = call.reference_backward(rmean, rinvstd, training)
    assert call.host(dx3).dtype == dtype
    assert_close(call.host(dx3), rdx, tol, "dx")
    assert_close(host(dgamma), rdgamma.reshape(-1), tol, "dgamma")
    assert_close(host(dbeta), rdbeta.reshape(-1), tol, "dbeta")


@pytest.mark.usefixtures("strided_rows")
@each_dtype
@pytest.mark.parametrize("case", list(CENTRED_FAMILY.values()), ids=list(CENTRED_FAMILY))
def test_family_normalize_with_matches_the_reference(case, dtype, rng):
    """group_normalize_with with given per-row statistics (instance norm in eval), and the eval
    backward with them."""
    call = FamilyCall(rng, case, dtype)
    rows = call.view[0]
    mean, invstd = rng.uniform(-1, 1, rows), rng.uniform(0.5, 2, rows)
    y3 = call.empty()
    gamma, beta = cuda.to_device(call.gamma), cuda.to_device(call.beta)
    assert call.steps.group_normalize_with(call.device(call.x), y3, call.groups,
                                           cuda.to_device(mean), cuda.to_device(invstd), gamma,
                                           beta) is None
    tol = tol_for(dtype)
    assert_close(call.host(y3), call.reference(mean=mean, invstd=invstd)[0], tol, "y")
    dx3, dgamma, dbeta = call.backward(cuda.to_device(mean), cuda.to_device(invstd), False)
    rdx, rdgamma, rdbeta = call.reference_backward(mean, invstd, False)
    assert_close(call.host(dx3), rdx, tol, "dx")
    assert_close(host(dgamma), rdgamma.reshape(-1), tol, "dgamma")
    assert_close(host(dbeta), rdbeta.reshape(-1), tol, "dbeta")


@pytest.mark.parametrize("case", [FAMILY[name] for name in ("layer", "group", "instance-2d")],
                         ids=["layer", "group", "instance-2d"])
def test_family_constant_row_gives_exactly_beta(case, rng):
    """A constant row (1e7 + 1 in float32) normalizes to exactly β; the other rows, offset by
    1e4, match the reference (statistics about each row's first value)."""
    call = FamilyCall(rng, case, np.float32, offset=1e4)
    _, runs, inner = call.view
    x3 = call.x.reshape(call.view)
    x3[1] = np.float32(1e7 + 1)
    y3, mean, var, _ = call.forward()
    y = host(y3)
    first = (1 % call.groups) * runs
    expected = np.broadcast_to(call.beta[first:first + runs, None], (runs, inner))
    assert np.array_equal(y[1], expected.astype(np.float32)), "a constant row gives exactly beta"
    assert host(var)[1] == 0.0 and host(mean)[1] == np.float32(1e7 + 1)
    assert_close(call.host(y3), call.reference()[0], tol_for(np.float32), "y")


@pytest.mark.usefixtures("strided_rows")
@pytest.mark.parametrize("case", [FAMILY[name] for name in ("layer", "group", "rms")],
                         ids=["layer", "group", "rms"])
def test_family_steps_are_bitwise_deterministic(case, rng):
    """Two runs (fresh steps) give the same bits; dx3=None gives the same parameter gradients;
    the module-level steps (the default stream) are the same computation."""
    call = FamilyCall(rng, case, np.float32)
    results = []
    for steps in (fastbn.cuda.Steps(), fastbn.cuda.Steps(), fastbn.cuda):
        call.steps = steps
        y3, mean, var, invstd = call.forward()
        dx3, dgamma, dbeta = call.backward(mean, invstd, True)
        results.append([host(a).tobytes() for a in (y3, var, invstd, dx3, dgamma, dbeta)
                        + ((mean,) if call.centred else ())])
        no_dx = call.backward(mean, invstd, True, with_dx=False)
        assert no_dx[0] is None
        assert [host(a).tobytes() for a in no_dx[1:]] == results[-1][4:6]
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("view", [(0, 4, 1), (0, 2, 3), (3, 0, 1), (3, 2, 0)])
def test_family_empty_views(view):
    """No rows: empty statistics and zero gradients; empty rows: NaN statistics (0/0), zero
    gradients; nothing is launched on an empty grid."""
    steps = fastbn.cuda.Steps()
    x3, y3 = cuda.device_array(view, np.float32), cuda.device_array(view, np.float32)
    gamma, beta = cuda.to_device(np.ones(view[1])), cuda.to_device(np.zeros(view[1]))
    for centred in (True, False):
        mean, var, invstd = steps.group_forward(x3, y3, 1, gamma, beta, EPS, centred)
        assert (mean is None) != centred
        assert host(var).shape == (view[0],) and np.isnan(host(var)).all()
        grads = steps.group_backward(y3, x3, y3, 1, mean, invstd, gamma, True)
        assert [host(g).tolist() for g in grads] == [[0.0] * view[1]] * 2
    steps.group_normalize_with(x3, y3, 1, invstd, invstd, gamma, beta)
