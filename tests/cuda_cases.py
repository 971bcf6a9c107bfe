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
from _util import (GPU_SMALL_BLOCKS, assert_close, each_dtype, each_layout, make_case,
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
    assert fastbn.__main__.main(["--device", "cuda", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    shape = "x".join(map(str, layout.small))
    assert "ok" in out and "FAILED" not in out, out
    for op in OPS:
        assert f"| NCHW | {shape} | {op.name} |" in out, out
    assert "n/a on the GPU" in out, out
