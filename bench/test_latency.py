"""Latency on the small tensors NumPy trainers use: median µs per call, where per-call overhead
counts as much as memory traffic.

One benchmark per op × shape × implementation, grouped ``latency|op|layout|shape``, the shapes
from ``fastbn.cases`` (``Layout.latency``). fastbn is called as a training loop calls it: without
``out=``, so that each call allocates its result. The ops: training forward, eval forward,
training backward, and a layer's training step (forward then backward: fastbn's ``BatchNorm``,
the same two NumPy functions, PyTorch's two ATen ops). Each call is checked against NumPy in
float64 before it is timed. CPU only.
"""
import time

import numba
import numpy as np
import pytest

import fastbn
from fastbn import _naive
from fastbn.cases import EPS, LAYOUTS, OPS, Case, torch_batch_norm

from test_bench import TOLERANCE, shape_name

IMPLS = ("fastbn", "numpy", "torch")
LAYER = "layer step"  # forward then backward, in training mode
OP_NAMES = tuple(op.name for op in OPS) + (LAYER,)
BACKWARD = next(op for op in OPS if op.name == "train bwd")


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("bench_quick")
    device = metafunc.config.getoption("bench_device")
    shapes = [(layout, shape) for layout in LAYOUTS for shape in layout.latency]
    metafunc.parametrize("layout,shape,op,impl", [] if device != "cpu" else [
        pytest.param(layout, shape, op, impl,
                     id=f"{op.replace(' ', '_')}-{layout.name}-{shape_name(shape)}-{impl}")
        for layout, shape in (shapes[:1] if quick else shapes)
        for op in OP_NAMES
        for impl in IMPLS])


def _layer_step(case, impl):
    """A training step of a batch-norm layer: forward, then backward; returns the backward's
    (dx, dgamma, dbeta)."""
    x, dy, axis = case.x, case.dy, case.axis
    if impl == "fastbn":
        layer = fastbn.BatchNorm(x.shape[axis], axis=axis, eps=EPS, dtype=x.dtype)
        layer.gamma[...], layer.beta[...] = case.gamma, case.beta

        def step():
            layer(x)
            return layer.backward(dy), layer.dgamma, layer.dbeta
        return step
    if impl == "numpy":
        gamma, beta = case.gamma, case.beta

        def step():
            _, mean, invstd = _naive.forward(x, gamma, beta, axis, True, eps=EPS)
            return _naive.backward(dy, x, mean, invstd, gamma, axis, True)
        return step
    bn = torch_batch_norm(case)

    def step():
        bn.train_forward()
        return bn.train_backward()
    return step


def _call(case, op, impl):
    """The call to time, and what turns its outputs into NumPy arrays."""
    if impl == "torch":
        bn = torch_batch_norm(case)
        if bn is None:
            pytest.skip('PyTorch is not installed (pip install -e ".[bench]")')
        if op == LAYER:
            return _layer_step(case, impl), bn.numpy
        return getattr(bn, next(o for o in OPS if o.name == op).peer), bn.numpy
    if op == LAYER:
        return _layer_step(case, impl), np.asarray
    spec = next(o for o in OPS if o.name == op)
    return (spec.fastbn(case) if impl == "fastbn" else spec.numpy(case)), np.asarray


def test_latency(benchmark, request, layout, shape, op, impl):
    case = Case(layout, shape, np.dtype(request.config.getoption("bench_dtype")))
    case.out = None  # fastbn allocates its result, as a training loop's call does
    call, to_numpy = _call(case, op, impl)
    result = call()  # the warm-up: compiles, or loads from Numba's cache
    checked = BACKWARD if op == LAYER else next(o for o in OPS if o.name == op)
    errors = case.errors(checked, result, to_numpy)
    tolerance = TOLERANCE[case.host["x"].dtype]
    for name, error in errors.items():
        if not error <= tolerance:
            pytest.fail(f"{impl} {op}: {name} differs from NumPy in float64 by {error:.1e}; "
                        f"not timed", pytrace=False)
    del result
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    iterations = int(np.clip(2e-3 / max(once, 1e-7), 1, 1000))  # rounds of about 2 ms
    benchmark.group = f"latency|{op}|{layout.name}|{shape_name(shape)}"
    benchmark.extra_info.update(kind="latency", op=op, layout=layout.name,
                                shape=shape_name(shape), dtype=str(case.x.dtype), impl=impl,
                                threads=numba.get_num_threads())
    benchmark.pedantic(call, rounds=25, warmup_rounds=2, iterations=iterations)
