"""fastbn against plain NumPy, PyTorch and a memcpy of the same tensor, on the CPU or the GPU.

One benchmark per op × layout × shape × implementation, grouped ``op|layout|shape``, the shapes
from ``fastbn.cases.LAYOUTS``. Each benchmark calls its implementation once (the warm-up), checks
that result against NumPy in float64, and only then times it. With ``--bench-device cuda`` the
tensors live on the GPU, PyTorch runs on CUDA (cuDNN), memcpy is a device-to-device copy, plain
NumPy is left out, and every timed call ends with a device synchronization. See README.md.
"""
import numba
import numpy as np
import pytest

import fastbn
from fastbn import _naive
from fastbn.cases import LAYOUTS

try:
    from fastbn._torch import TorchBatchNorm
except ImportError:
    TorchBatchNorm = None

OPS = ("train fwd", "eval fwd", "train bwd")
IMPLS = {"cpu": ("fastbn", "numpy", "torch", "memcpy"), "cuda": ("fastbn", "torch", "memcpy")}
MOMENTUM, EPS = 0.1, 1e-5
# Largest error allowed against the float64 reference, as max|actual - reference| over
# max(1, max|reference|): float32 sums over millions of values lose a few digits.
TOLERANCE = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-9}


def shape_name(shape):
    return "x".join(map(str, shape))


def pytest_generate_tests(metafunc):
    # Ops and implementations vary fastest, so one shape's tensors serve all of their benchmarks.
    quick = metafunc.config.getoption("bench_quick")
    device = metafunc.config.getoption("bench_device")
    metafunc.parametrize("layout,shape,op,impl", [
        pytest.param(layout, shape, op, impl,
                     id=f"{op.replace(' ', '_')}-{layout.name}-{shape_name(shape)}-{impl}")
        for layout in LAYOUTS
        for shape in ((layout.small,) if quick else
                      layout.bench + (layout.gpu_bench if device == "cuda" else ()))
        for op in OPS
        for impl in IMPLS[device]])


class Case:
    """The tensors of one layout and shape, and the float64 NumPy reference of each op."""

    def __init__(self, layout, shape, dtype, device):
        rng = np.random.default_rng(0)
        self.device = device
        channels = shape[layout.axis]
        self.axis = layout.axis
        self.x = rng.standard_normal(shape, dtype)
        self.x *= 2
        self.x += 3
        self.dy = rng.standard_normal(shape, dtype)
        self.gamma = rng.uniform(0.5, 1.5, channels).astype(dtype)
        self.beta = rng.normal(size=channels).astype(dtype)
        self.running_mean = rng.normal(3.0, 0.1, channels).astype(dtype)
        self.running_var = rng.uniform(3.0, 5.0, channels).astype(dtype)
        self.out = np.empty_like(self.x)
        self._reference = None, None
        self.host = {name: getattr(self, name) for name in
                     ("x", "dy", "gamma", "beta", "running_mean", "running_var")}
        if device == "cuda":  # the implementations' arrays live on the GPU
            from numba import cuda
            for name, a in self.host.items():
                setattr(self, name, cuda.to_device(a))
            self.out = cuda.device_array_like(self.x)

    def running(self):
        """Fresh copies of the running statistics, for an implementation that updates them."""
        copies = self.host["running_mean"].copy(), self.host["running_var"].copy()
        if self.device == "cuda":
            from numba import cuda
            return tuple(cuda.to_device(a) for a in copies)
        return copies

    def synchronized(self, call):
        """``call``, ending with a device synchronization on the GPU (so that timing is real)."""
        if self.device != "cuda":
            return call
        from numba import cuda

        def run():
            result = call()
            cuda.synchronize()  # the whole device: PyTorch's kernels too
            return result
        return run

    def reference(self, op):
        """The outputs of ``op``, computed by NumPy in float64."""
        if self._reference[0] != op:
            self._reference = None, None  # free the last op's before computing this one's
            x, dy, gamma, beta, mean, var = (a.astype(np.float64) for a in self.host.values())
            if op == "train fwd":
                outputs = _naive.forward(x, gamma, beta, self.axis, True, eps=EPS)[:1]
            elif op == "eval fwd":
                outputs = _naive.forward(x, gamma, beta, self.axis, False, mean, var, EPS)[:1]
            else:
                _, mean, invstd = _naive.forward(x, gamma, beta, self.axis, True, eps=EPS)
                outputs = _naive.backward(dy, x, mean, invstd, gamma, self.axis, True)
            self._reference = op, outputs
        return self._reference[1]


@pytest.fixture(scope="module")
def cases(request):
    """``cases(layout, shape)``: that shape's Case, built once; only the latest one is kept."""
    dtype = np.dtype(request.config.getoption("bench_dtype"))
    device = request.config.getoption("bench_device")
    current = {}

    def get(layout, shape):
        key = layout.name, shape
        if key not in current:
            current.clear()  # free the last shape's tensors (up to a few hundred MB each) first
            current[key] = Case(layout, shape, dtype, device)
        return current[key]

    yield get
    current.clear()


# -- the implementations: each returns the call to time, whose result is the op's outputs -------


def _fastbn(case, op):
    # out= writes y (or dx) into a preallocated array: fastbn's fast path, without allocation.
    x, dy, gamma, beta, axis, out = case.x, case.dy, case.gamma, case.beta, case.axis, case.out
    if op == "train fwd":
        mean, var = case.running()
        return lambda: fastbn.forward(x, gamma, beta, axis=axis, running_mean=mean,
                                      running_var=var, momentum=MOMENTUM, eps=EPS, out=out)[0]
    if op == "eval fwd":
        return lambda: fastbn.forward(x, gamma, beta, axis=axis, training=False,
                                      running_mean=case.running_mean,
                                      running_var=case.running_var, eps=EPS, out=out)[0]
    _, stats = fastbn.forward(x, gamma, beta, axis=axis, eps=EPS)
    return lambda: fastbn.backward(dy, x, stats, gamma, axis=axis, out=out)


def _numpy(case, op):
    x, dy, gamma, beta, axis = case.x, case.dy, case.gamma, case.beta, case.axis
    if op == "train fwd":
        return lambda: _naive.forward(x, gamma, beta, axis, True, eps=EPS)[0]
    if op == "eval fwd":
        return lambda: _naive.forward(x, gamma, beta, axis, False, case.running_mean,
                                      case.running_var, EPS)[0]
    _, mean, invstd = _naive.forward(x, gamma, beta, axis, True, eps=EPS)
    return lambda: _naive.backward(dy, x, mean, invstd, gamma, axis, True)


def _torch(case, op):
    if TorchBatchNorm is None:
        pytest.skip('PyTorch is not installed (pip install -e ".[bench]")')
    if case.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            pytest.skip("this PyTorch has no CUDA")
    bn = TorchBatchNorm(case.x, case.dy, case.gamma, case.beta, case.axis, *case.running(),
                        momentum=MOMENTUM, eps=EPS)
    case.to_numpy = bn.numpy  # PyTorch's results as arrays in x's layout, for the check
    return {"train fwd": bn.train_forward, "eval fwd": bn.eval_forward,
            "train bwd": bn.train_backward}[op]


def _memcpy(case, op):
    if case.device == "cuda":
        return lambda: case.out.copy_to_device(case.x)  # device to device
    return lambda: np.copyto(case.out, case.x)


def _on_host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


IMPLEMENTATIONS = {"fastbn": _fastbn, "numpy": _numpy, "torch": _torch, "memcpy": _memcpy}


def _check(result, case, op, impl):
    """Fail, with the error found, unless ``result`` agrees with the float64 reference."""
    if impl == "memcpy":
        if not np.array_equal(_on_host(case.out), case.host["x"]):
            pytest.fail("memcpy: the copy differs from x; not timed", pytrace=False)
        return
    outputs = [case.to_numpy(a) if impl == "torch" else _on_host(a) for a in _as_tuple(result)]
    tolerance = TOLERANCE[case.host['x'].dtype]
    names = ("y",) if op.endswith("fwd") else ("dx", "dgamma", "dbeta")
    for name, actual, expected in zip(names, outputs, case.reference(op), strict=True):
        if actual.shape != expected.shape:
            pytest.fail(f"{impl} {op}: {name} has shape {actual.shape}, expected "
                        f"{expected.shape}", pytrace=False)
        scale = max(1.0, float(np.max(np.abs(expected))))
        error = float(np.max(np.abs(actual - expected))) / scale
        if not error <= tolerance:  # NaN fails too
            pytest.fail(f"{impl} {op}: {name} differs from NumPy in float64 by {error:.1e} "
                        f"(max abs error / max(1, max|reference|)), more than {tolerance:.0e}; "
                        f"not timed", pytrace=False)


def _rounds(nbytes, impl):
    """Timed rounds, so that a benchmark moves a few GB at the most: fewer for big tensors."""
    budget = 1e9 if impl == "numpy" else 8e9  # plain NumPy is some ten times slower
    return int(np.clip(budget // nbytes, 3, 100))


def test_bench(benchmark, cases, layout, shape, op, impl):
    case = cases(layout, shape)
    call = case.synchronized(IMPLEMENTATIONS[impl](case, op))
    # The warm-up: the first call compiles fastbn's Numba kernels, or loads them from the on-disk
    # cache that fastbn keeps, and touches every page of the output.
    result = call()
    _check(result, case, op, impl)
    del result

    nbytes = (2 if op.endswith("fwd") else 3) * case.x.nbytes  # x, y; or dy, x, dx
    benchmark.group = f"{op}|{layout.name}|{shape_name(shape)}"
    benchmark.extra_info.update(op=op, layout=layout.name, shape=shape_name(shape),
                                dtype=str(case.x.dtype), impl=impl, bytes=nbytes,
                                device=case.device, threads=numba.get_num_threads())
    benchmark.pedantic(call, rounds=_rounds(nbytes, impl), warmup_rounds=1, iterations=1)
