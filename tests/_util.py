"""Small helpers shared by the tests: tolerances, parametrizations, data generators, argument
snapshots, shrunk block sizes, and a runner of subprocesses (on the real GPU or the simulator).

``host`` and ``on_device`` (to move arrays off and onto the GPU) are ``fastbn.cases``', which
``python -m fastbn`` and the benchmarks use too.
"""
import functools
import os
import subprocess
import sys

import numpy as np
import pytest

from fastbn.cases import LAYOUTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Block sizes small enough that the tests' small shapes run every multi-chunk / multi-tile /
# multi-segment / multi-column-block merge path of the CPU kernels (fastbn.cpu).
# PARALLEL_MIN = 0 sends even these small shapes through the thread pool (the default runs them
# on the calling thread); test_determinism checks that both give the same bits.
CPU_SMALL_BLOCKS = {"CHUNK": 16, "TILE_ROWS": 3, "SEGMENT": 40, "COLUMN_BLOCK": 3,
                    "PARALLEL_MIN": 0, "NORM_BLOCKS": 3}
# The same for the GPU kernels (fastbn.cuda): several blocks per channel and the grid-level
# merge. Used under Numba's CUDA simulator only; a real GPU runs its default sizes.
GPU_SMALL_BLOCKS = {"THREADS": 8, "COLUMNS": 4, "CHUNK": 20, "SEGMENT": 5, "TILE": 2}

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}
DTYPES = (np.float32, np.float64)
LAYOUT_IDS = [lay.name for lay in LAYOUTS]

# The parametrizations most tests share, with the same argument names and ids everywhere.
each_layout = pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
each_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
each_mode = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
plain_or_affine = pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])


def tol_for(*dtypes):
    """The contract's tolerance: 1e-5 if any of the dtypes is float32, else 1e-10."""
    return max(TOL[np.dtype(d)] for d in dtypes if d is not None)


def assert_close(actual, expected, tol, err_msg=""):
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol * scale,
                               err_msg=err_msg)


def bcast(v, ndim, axis):
    """Reshape a (C,) vector so that it broadcasts along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


def make_x(rng, shape, axis=1, dtype=np.float64, offset=None, scale=None):
    """Random data whose channels have different means and spreads."""
    c = shape[axis]
    if offset is None:
        offset = rng.uniform(-3, 3, c)
    if scale is None:
        scale = rng.uniform(0.5, 2.0, c)
    offset = np.broadcast_to(np.asarray(offset, dtype=np.float64), (c,))
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (c,))
    x = rng.standard_normal(shape) * bcast(scale, len(shape), axis) + bcast(offset, len(shape), axis)
    return x.astype(dtype)


def make_affine(rng, c, dtype=np.float64):
    gamma = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
    beta = rng.uniform(-1.0, 1.0, c).astype(dtype)
    return gamma, beta


def make_running(rng, c, dtype=np.float64):
    rm = rng.uniform(-1.0, 1.0, c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    return rm, rv


def make_case(rng, shape, axis, dtype=np.float64, **x_options):
    """x, dy, gamma, beta, running_mean, running_var for one shape, drawn in that order
    (x_options go to make_x for x)."""
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype, **x_options)
    dy = make_x(rng, shape, axis, dtype)
    gamma, beta = make_affine(rng, c)
    rm, rv = make_running(rng, c)
    return x, dy, gamma, beta, rm, rv


class Snapshot:
    """Bitwise copies of arrays, to check that a call left them untouched."""

    def __init__(self, **arrays):
        self.saved = {k: (v, None if v is None else np.array(v, copy=True))
                      for k, v in arrays.items() if isinstance(v, np.ndarray) or v is None}

    def assert_unchanged(self):
        for name, (live, copy) in self.saved.items():
            if live is None:
                continue
            assert live.dtype == copy.dtype and live.shape == copy.shape, name
            assert live.tobytes() == copy.tobytes(), f"{name} was modified"


def numeric_grad(f, a, h=1e-6):
    """Central finite differences of the scalar ``f()`` with respect to ``a``, perturbed in place."""
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + h
        fp = f()
        a[i] = old - h
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def shrink_blocks(monkeypatch, module, blocks):
    """Set ``module``'s block-size constants to ``blocks`` for the test (undone after it)."""
    for name, value in blocks.items():
        assert hasattr(module, name), f"{module.__name__} has no block size {name}"
        monkeypatch.setattr(module, name, value)


def run(argv, env=None, timeout=600, check=True):
    """Run ``argv`` in the repository root, with this checkout's fastbn first on PYTHONPATH and
    ``env`` over os.environ (a value of None removes that variable). Returns the
    CompletedProcess (text output); with ``check``, fails with its output unless it exits 0."""
    environment = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT,
                                                              environment.get("PYTHONPATH")]))
    proc = subprocess.run(argv, cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, (f"{' '.join(map(str, argv))} exited with {proc.returncode}"
                                      f":\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_python(*args, **kwargs):
    """``python *args`` (a script and its arguments, ``-m module ...`` or ``-c code``) by
    :func:`run`, in this interpreter."""
    return run([sys.executable, *args], **kwargs)


@functools.cache
def gpu_usable():
    """Whether numba.cuda finds a usable GPU here (not the simulator). Asked in a subprocess, so
    that the tests' own process never initializes CUDA."""
    out = run_python("-c", "from numba import cuda; print(cuda.is_available())",
                     env={"NUMBA_ENABLE_CUDASIM": None}, timeout=300).stdout.split()
    assert out and out[-1] in ("True", "False"), f"numba.cuda.is_available() printed {out}"
    return out[-1] == "True"


def gpu_env():
    """``(where, env)``: where GPU code runs here, "real GPU" or "CUDA simulator", and the
    environment that runs it there (for :func:`run`): Numba's simulator where no GPU is usable."""
    if gpu_usable():
        return "real GPU", {"NUMBA_ENABLE_CUDASIM": None}
    return "CUDA simulator", {"NUMBA_ENABLE_CUDASIM": "1"}
