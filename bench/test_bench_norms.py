"""The normalization family (layer, RMS, group and instance norm) against the peers and plain
copies of the same tensor.

One benchmark per op × pass × shape × implementation, grouped ``norm|op|pass|shape``. The ops and
their shapes: ``fastbn.cases.FAMILY`` (layer and RMS norm over the last axis of rows of 768 to
4096 values, group norm with G = 32 and instance norm on the planar bench shapes, and each
one's trainer-sized latency shapes); with ``--bench-quick``, each op's small test shape. The
passes: the forward (``fwd``, training statistics) and the backward (``bwd``, given the
statistics of a forward run once). The implementations:

- ``fastbn``: ``fastbn.layer_norm`` (``group_norm``, ...) and ``fastbn.layer_norm_backward``
  (...) writing into used arrays (``out=``);
- ``memcpy`` and ``copy``: a plain copy of x (``np.copyto``, and one on Numba's threads), the
  yardstick as in test_bench.py: the faster of the two;
- ``torch``: PyTorch's eager ops (``torch.nn.functional``'s forward; layer and group norm's
  ATen gradient ops, autograd's backward on a kept graph for instance and RMS norm);
- ``jax``, ``tensorflow``: the op written from their array ops (jitted; ``tf.function``), the
  backward from the saved statistics;
- ``onnxruntime``: the op's own ONNX operator (forward only).

(``fastbn._peers``: ``TorchNorm``, ``JaxNorm``, ``TensorFlowNorm``, ``OnnxRuntimeNorm``.)

Each benchmark calls its implementation once (the warm-up: it compiles fastbn's kernels, or
loads them from the cache, and touches the output's pages), checks every output against the
float64 reference of the tests (``tests/reference.py``: ``normalize``, ``normalize_backward``)
and then times it: fastbn's or a copy's wrong result fails the benchmark untimed; a peer's is
timed and flagged (``extra_info["valid"]``), as in test_bench.py. Small tensors are timed in
rounds of about 2 ms, big ones in 3 or more single calls (a few GB moved per benchmark). CPU only.
"""
import importlib.util
import os
import time

import numba
import numpy as np
import pytest
from test_bench import TOLERANCE, shape_name

from fastbn import _peers
from fastbn.cases import EPS, FAMILY, PEERS, NormCase, norm_peer

FORWARD, BACKWARD = "fwd", "bwd"
OP_NAMES = (FORWARD, BACKWARD)
# The bytes a pass must move at the least, in x.nbytes: x and y; dy, x and dx.
MOVES = {FORWARD: 2, BACKWARD: 3}
IMPLS = ("fastbn", "memcpy", "copy", *PEERS)
COPIES = ("memcpy", "copy")
PEER_CALLS = {FORWARD: _peers.FORWARD, BACKWARD: _peers.BACKWARD}
# The float64 reference is computed over pieces of x along its first axis of about this many
# values each (its temporaries are float64 arrays of the piece's size).
REFERENCE_PIECE = 1 << 22


def _load_reference():
    """tests/reference.py, the float64 reference of the tests (tests/ is not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "fastbn_bench_reference", os.path.join(root, "tests", "reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def shapes(quick):
    """``[(norm, shape), ...]``: each op's bench shapes, then its latency ones."""
    if quick:
        return [(norm, norm.small) for norm in FAMILY]
    return [(norm, shape) for norm in FAMILY for shape in norm.bench + norm.latency]


def pytest_generate_tests(metafunc):
    # Passes and implementations vary fastest: one shape's arrays and references serve them all.
    quick = metafunc.config.getoption("bench_quick")
    device = metafunc.config.getoption("bench_device")
    metafunc.parametrize("norm,shape,op,impl", [] if device != "cpu" else [
        pytest.param(norm, shape, op, impl,
                     id=f"{norm.function}-{op}-{shape_name(shape)}-{impl}")
        for norm, shape in shapes(quick)
        for op in OP_NAMES
        for impl in IMPLS])


class CheckedCase:
    """A :class:`fastbn.cases.NormCase` and the float64 reference of its passes (computed once
    per shape and pass, piece by piece along x's first axis; only the latest pass's is kept)."""

    def __init__(self, norm, shape, dtype):
        self.case = c = NormCase(norm, shape, dtype)
        self.norm, self.x = norm, c.x
        self._statistics, self._reference = None, (None, None)

    def _pieces(self):
        """Slices of x's first axis of about REFERENCE_PIECE values each."""
        step = max(1, REFERENCE_PIECE // max(1, self.x[0].size))
        return [slice(i, i + step) for i in range(0, self.x.shape[0], step)]

    def _arguments(self):
        """tests/reference.py's description of the op: kind, groups, centred."""
        if not self.norm.channels:
            return {"kind": "layer", "groups": 1}
        return {"kind": "group", "groups": self.norm.view(self.x.shape)[1]}

    def _forward(self, keep_y):
        """The float64 y (if ``keep_y``) and the per-row mean (None for RMS norm) and invstd."""
        c, arguments = self.case, self._arguments()
        y = np.empty(self.x.shape) if keep_y else None
        means, invstds = [], []
        for piece in self._pieces():
            out, mean, _, invstd = reference.normalize(
                c.x[piece], eps=EPS, gamma=c.gamma, beta=c.beta, centred=self.norm.centred,
                **arguments)
            if keep_y:
                y[piece] = out
            means.append(mean)
            invstds.append(invstd)
        mean = None if means[0] is None else np.concatenate(means)
        return y, mean, np.concatenate(invstds)

    def reference(self, op):
        """The float64 outputs of pass ``op``, in the order of ``norm.outputs``."""
        if self._reference[0] == op:
            return self._reference[1]
        self._reference = None, None  # free the last pass's (up to a few hundred MB) first
        if op == FORWARD:
            y, *self._statistics = self._forward(keep_y=True)
            result = (y,)
        else:
            if self._statistics is None:
                self._statistics = self._forward(keep_y=False)[1:]
            mean, invstd = self._statistics
            c, arguments = self.case, self._arguments()
            dx = np.empty(self.x.shape)
            rows = 0
            dgamma = dbeta = 0.0
            for piece in self._pieces():
                count = int(np.prod(self.norm.stats_shape(c.x[piece].shape)))
                part = slice(rows, rows + count)
                rows += count
                dx[piece], dg, db = reference.normalize_backward(
                    c.dy[piece], c.x[piece], None if mean is None else mean[part],
                    invstd[part], gamma=c.gamma, **arguments)
                dgamma, dbeta = dgamma + dg, dbeta + db
            shape = self.norm.parameter_shape(self.x.shape)
            result = (dx, dgamma.reshape(shape), dbeta.reshape(shape))[
                :len(self.norm.outputs(True))]
        self._reference = op, result
        return result

    def errors(self, op, result):
        """``{output: error}``: max|actual - reference| over max(1, max|reference|), NaN where
        there is one. Raises ValueError for a wrong number of outputs or a wrong shape."""
        names = self.norm.outputs(op == BACKWARD)
        if len(result) != len(names):
            raise ValueError(f"{len(result)} outputs, expected {len(names)}")
        errors = {}
        for name, actual, wanted in zip(names, result, self.reference(op), strict=True):
            actual = np.asarray(actual)
            if actual.shape != wanted.shape:
                raise ValueError(f"{name} has shape {actual.shape}, expected {wanted.shape}")
            scale = max(1.0, float(np.max(np.abs(wanted))))
            pieces = self._pieces() if actual.shape == self.x.shape else [slice(None)]
            errors[name] = max(float(np.max(np.abs(actual[piece] - wanted[piece])))
                               for piece in pieces) / scale
        return errors


@pytest.fixture(scope="module")
def cases(request):
    """``cases(norm, shape)``: that shape's CheckedCase, built once; only the latest is kept."""
    dtype = np.dtype(request.config.getoption("bench_dtype"))
    current = {}

    def get(norm, shape):
        key = norm.name, shape
        if key not in current:
            current.clear()  # free the last shape's arrays (up to a few hundred MB each) first
            current[key] = CheckedCase(norm, shape, dtype)
        return current[key]

    yield get
    current.clear()


# -- the implementations: each makes ``(call, to_numpy)``, the call to time (which returns a ----
# -- tuple of outputs) and what turns one output into a NumPy array -----------------------------


def _fastbn(c, op):
    call = c.case.fastbn_forward() if op == FORWARD else c.case.fastbn_backward()
    return call, np.asarray


def _copy(kind):
    def make(c, op):
        copy = c.case.memcpy() if kind == "memcpy" else c.case.threaded_copy()
        out = c.case.out
        return (lambda: (copy(), out)[1:]), np.asarray
    return make


def _peer(name):
    def make(c, op):
        try:
            peer = norm_peer(c.case, name)
        except _peers.Unavailable as reason:
            pytest.skip(str(reason))
        if PEER_CALLS[op] not in peer.OPS:
            pytest.skip(f"{_peers.LABELS[name]} has no {c.norm.name} {op}")
        call = getattr(peer, PEER_CALLS[op])
        if op == FORWARD:
            return (lambda: (call(),)), peer.numpy
        return call, peer.numpy
    return make


IMPLEMENTATIONS = {"fastbn": _fastbn, "memcpy": _copy("memcpy"), "copy": _copy("copy"),
                   **{name: _peer(name) for name in PEERS}}


def _check(result, c, op, impl, to_numpy=np.asarray):
    """None if ``result`` agrees with the float64 reference, else what is wrong with it:
    fastbn's and a copy's wrong result fail the benchmark, a peer's is timed and flagged."""
    if impl in COPIES:
        if not np.array_equal(result[0], c.x):
            pytest.fail(f"{impl}: the copy differs from x; not timed", pytrace=False)
        return None
    what = f"{impl} {c.norm.name} {op}"
    try:
        errors = c.errors(op, tuple(map(to_numpy, result)))
    except ValueError as error:
        pytest.fail(f"{what}: {error}; not timed", pytrace=False)
    tolerance = TOLERANCE[c.x.dtype]
    for name, error in errors.items():
        if not error <= tolerance:  # NaN fails too
            problem = (f"{name} differs from the float64 reference by {error:.1e} (max abs "
                       f"error / max(1, max|reference|)), more than {tolerance:.0e}")
            if impl not in PEERS:
                pytest.fail(f"{what}: {problem}; not timed", pytrace=False)
            return problem
    return None


def test_norm(benchmark, cases, norm, shape, op, impl):
    c = cases(norm, shape)
    call, to_numpy = IMPLEMENTATIONS[impl](c, op)
    # The warm-up: compiles fastbn's kernels (or loads them from the cache), touches the pages.
    result = call()
    problem = _check(result, c, op, impl, to_numpy)
    del result

    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    iterations = int(np.clip(2e-3 / max(once, 1e-7), 1, 1000))  # rounds of about 2 ms
    nbytes = MOVES[op] * c.x.nbytes
    rounds = int(np.clip(4e9 // (nbytes * iterations), 3, 25))  # a few GB per benchmark at most
    benchmark.group = f"norm|{norm.name}|{op}|{shape_name(shape)}"
    benchmark.extra_info.update(kind="norm", norm=norm.name, op=op, shape=shape_name(shape),
                                dtype=str(c.x.dtype), impl=impl, bytes=nbytes, device="cpu",
                                threads=numba.get_num_threads(), valid=problem is None,
                                **({"problem": problem} if problem else {}))
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=iterations)
