"""fastbn against plain NumPy, the peers (PyTorch, JAX, TensorFlow, ONNX Runtime) and plain
copies of the same tensor, on the CPU or the GPU.

One benchmark per op × layout × shape × implementation, grouped ``op|layout|shape``, the ops and
shapes from ``fastbn.cases`` (``OPS``, ``LAYOUTS``). fastbn is timed twice: writing into a used
array (``out=``) and, as most callers call it, into a new one (``fastbn-new``). The yardstick is
the fastest plain copy of the tensor with fastbn's thread count: the faster of ``np.copyto``
(``memcpy``) and a copy on Numba's threads (``copy``); beside it, not part of it, the same copy
with the streaming stores that fastbn's maps use on outputs larger than the cache
(``streaming-copy``). Each benchmark calls its implementation
once (the warm-up), checks that result against NumPy in float64, and only then times it: fastbn
and NumPy fail the benchmark on a wrong result; a peer's wrong result is timed and flagged
(``extra_info["valid"]``), as the report shows. A peer that is not installed is skipped. With
``--bench-device cuda`` the tensors live on the GPU, PyTorch runs on CUDA (cuDNN), memcpy is a
device-to-device copy, NumPy and the CPU-only peers are left out, and every timed call ends with
a device synchronization. See README.md.
"""
import numba
import numpy as np
import pytest

from fastbn import _peers
from fastbn.cases import LAYOUTS, OPS, PEERS, Case, host, peer

IMPLS = {"cpu": ("fastbn", "fastbn-new", "numpy", *PEERS, "memcpy", "copy", "streaming-copy"),
         "cuda": ("fastbn", "fastbn-new", "torch", "memcpy")}
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
                     id=f"{op.name.replace(' ', '_')}-{layout.name}-{shape_name(shape)}-{impl}")
        for layout in LAYOUTS
        for shape in ((layout.small,) if quick else
                      layout.bench + (layout.gpu_bench if device == "cuda" else ()))
        for op in OPS
        for impl in IMPLS[device]])


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


# -- the implementations: each returns the call to time and what turns its outputs into arrays --


def _peer(name):
    def make(case, op):
        try:
            bn = peer(case, name)
        except _peers.Unavailable as reason:
            pytest.skip(str(reason))
        if op.peer not in getattr(bn, "OPS", (op.peer,)):
            pytest.skip(f"{_peers.LABELS[name]} has no {op.name}")
        return getattr(bn, op.peer), bn.numpy  # results as arrays in x's layout
    return make


def _fastbn_new(case, op):
    """fastbn without ``out=``: each call allocates its result, as most callers' calls do."""
    out, case.out = case.out, None
    try:
        return op.fastbn(case), host
    finally:
        case.out = out


def _cpu_copy(kind):
    def make(case, op):
        if case.device != "cpu":
            pytest.skip(f"the {kind} copy is the CPU's")
        return getattr(case, f"{kind}_copy")(), host
    return make


IMPLEMENTATIONS = {"fastbn": lambda case, op: (op.fastbn(case), host),
                   "fastbn-new": _fastbn_new,
                   "numpy": lambda case, op: (op.numpy(case), host),
                   **{name: _peer(name) for name in PEERS},
                   "memcpy": lambda case, op: (case.memcpy(), host),
                   "copy": _cpu_copy("threaded"),
                   "streaming-copy": _cpu_copy("streaming")}
COPIES = ("memcpy", "copy", "streaming-copy")


def _check(result, case, op, impl, to_numpy=host):
    """None if ``result`` agrees with the float64 reference, else what is wrong with it: fastbn,
    NumPy and the copies fail the benchmark; a peer's wrong result is timed and flagged."""
    if impl in COPIES:
        if not np.array_equal(host(case.out), case.host["x"]):
            pytest.fail(f"{impl}: the copy differs from x; not timed", pytrace=False)
        return None
    try:
        errors = case.errors(op, result, to_numpy)
    except ValueError as error:
        pytest.fail(f"{impl} {op.name}: {error}; not timed", pytrace=False)
    tolerance = TOLERANCE[case.host["x"].dtype]
    for name, error in errors.items():
        if not error <= tolerance:  # NaN fails too
            problem = (f"{name} differs from NumPy in float64 by {error:.1e} (max abs error / "
                       f"max(1, max|reference|)), more than {tolerance:.0e}")
            if impl not in PEERS:
                pytest.fail(f"{impl} {op.name}: {problem}; not timed", pytrace=False)
            return problem
    return None


def _rounds(nbytes, impl):
    """Timed rounds, so that a benchmark moves a few GB at the most: fewer for big tensors."""
    budget = 1e9 if impl == "numpy" else 8e9  # plain NumPy is some ten times slower
    return int(np.clip(budget // nbytes, 3, 100))


def test_bench(benchmark, cases, layout, shape, op, impl):
    case = cases(layout, shape)
    call, to_numpy = IMPLEMENTATIONS[impl](case, op)
    call = case.synchronized(call)
    # The warm-up: the first call compiles fastbn's Numba kernels, or loads them from the on-disk
    # cache that fastbn keeps, and touches every page of the output.
    result = call()
    problem = _check(result, case, op, impl, to_numpy)
    del result

    nbytes = op.moves * case.x.nbytes  # x, y; or dy, x, dx
    benchmark.group = f"{op.name}|{layout.name}|{shape_name(shape)}"
    benchmark.extra_info.update(op=op.name, layout=layout.name, shape=shape_name(shape),
                                dtype=str(case.x.dtype), impl=impl, bytes=nbytes,
                                device=case.device, threads=numba.get_num_threads(),
                                valid=problem is None, **({"problem": problem} if problem else {}))
    benchmark.pedantic(call, rounds=_rounds(nbytes, impl), warmup_rounds=1, iterations=1)
