"""Batch norm fused with a residual add and a ReLU, ``y = relu(BN(x) + r)``, against the same op
in unfused steps, PyTorch and plain batch norm, on the planar and channels-last shapes.

One benchmark per op × layout × shape × implementation, grouped ``fused|op|layout|shape``. The
ops: training forward (``fwd``), and training forward then backward (``fwd+bwd``: the backward
masks dy with ``y > 0`` and returns the residual's gradient, the masked dy, as well as dx, dgamma
and dbeta). The shapes: the NCHW and NHWC layouts' ``bench`` shapes and their trainer-sized
``latency`` shapes (``fastbn.cases.LAYOUTS``); with ``--bench-quick``, their small test shapes.
The implementations:

- ``fastbn-fused``: ``fastbn.forward(..., residual=r, activation="relu")`` and
  ``fastbn.backward(..., activation="relu", y=y, dresidual=...)``;
- ``fastbn-unfused``: ``fastbn.forward``, then ``np.add`` and ``np.maximum`` in place; backward:
  the mask and the masked dy in NumPy, then ``fastbn.backward`` on it;
- ``torch``: PyTorch's eager ops without autograd's bookkeeping: ``native_batch_norm``, ``add_``,
  ``relu_``, then ``threshold_backward`` (the ReLU's mask) and ``native_batch_norm_backward``
  (autograd on ``F.batch_norm``, ``add_`` and ``relu_`` measured no faster here);
- ``fastbn-plain``: plain batch norm (``fastbn.forward`` / ``fastbn.backward``) on the same
  tensors: what the fusion costs on top of it;
- ``memcpy`` and ``copy``: a plain copy of x (``np.copyto`` and one on Numba's threads), the
  yardstick as in test_bench.py.

fastbn writes into used arrays (``out=``, a used ``dresidual``), NumPy's steps too; PyTorch
allocates its results. Each benchmark calls its implementation once (the warm-up), checks every
output against NumPy in float64 (a wrong result fails it, untimed), then times it: rounds of
about 2 ms for the small tensors, a number of rounds that shrinks with the tensor's size for the
big ones. CPU only.
"""
import time

import numba
import numpy as np
import pytest
from test_bench import TOLERANCE, shape_name

import fastbn
from fastbn import _naive
from fastbn.cases import EPS, LAYOUTS, MOMENTUM, Case

FORWARD, BOTH = "fwd", "fwd+bwd"
OP_NAMES = (FORWARD, BOTH)
# What a call returns, and the bytes the op must move at the least, in x.nbytes: forward reads
# x and r and writes y; backward reads dy, x and y and writes dx and the residual's gradient.
OUTPUTS = {FORWARD: ("y",), BOTH: ("y", "dx", "dgamma", "dbeta", "dresidual")}
PLAIN_OUTPUTS = {FORWARD: ("y",), BOTH: ("y", "dx", "dgamma", "dbeta")}
MOVES = {FORWARD: 3, BOTH: 8}
IMPLS = ("fastbn-fused", "fastbn-unfused", "fastbn-plain", "memcpy", "copy", "torch")
COPIES = ("memcpy", "copy")
FUSED_LAYOUTS = ("NCHW", "NHWC")  # planar and channels-last


def shapes(quick):
    """``[(layout, shape), ...]``: the bench shapes, then the latency ones, of each layout."""
    layouts = [layout for layout in LAYOUTS if layout.name in FUSED_LAYOUTS]
    if quick:
        return [(layout, layout.small) for layout in layouts]
    return [(layout, shape) for layout in layouts for shape in layout.bench + layout.latency]


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("bench_quick")
    device = metafunc.config.getoption("bench_device")
    metafunc.parametrize("layout,shape,op,impl", [] if device != "cpu" else [
        pytest.param(layout, shape, op, impl,
                     id=f"{op.replace('+', '_')}-{layout.name}-{shape_name(shape)}-{impl}")
        for layout, shape in shapes(quick)
        for op in OP_NAMES
        for impl in IMPLS])


class FusedCase:
    """The arrays of one shape (``fastbn.cases.Case``'s, plus a residual and the used output
    buffers), and the float64 references of the fused and the plain op."""

    def __init__(self, layout, shape, dtype):
        self.case = case = Case(layout, shape, dtype)
        self.layout, self.axis = layout, case.axis
        self.x, self.dy, self.gamma, self.beta = case.x, case.dy, case.gamma, case.beta
        self.residual = np.random.default_rng(1).standard_normal(shape, dtype)
        self.y, self.dx = np.empty_like(self.x), np.empty_like(self.x)
        self.dresidual = np.empty_like(self.x)
        self.mask = np.empty(shape, bool)
        self._plain, self._references = None, {}

    def wide(self, name):
        return self.case.host[name].astype(np.float64) if name != "residual" else \
            self.residual.astype(np.float64)

    def _forward(self):
        """``(x, y, mean, invstd)`` of plain batch norm in float64, computed once per shape."""
        if self._plain is None:
            x = self.wide("x")
            self._plain = (x, *_naive.forward(x, self.wide("gamma"), self.wide("beta"),
                                              self.axis, True, eps=EPS))
        return self._plain

    def reference(self, op, plain=False, mask=None):
        """The float64 outputs of ``op`` (the fused one, or with ``plain`` plain batch norm), as
        a tuple in the order of ``OUTPUTS`` (``PLAIN_OUTPUTS``). ``mask``: the ReLU's mask to
        take in backward instead of the reference's own ``y > 0`` (not cached)."""
        key = op, plain
        if mask is None and key in self._references:
            return self._references[key]
        if any(op != cached for cached, _ in self._references):
            self._references.clear()  # the last op's (a few hundred MB each) are done with
        x, y, mean, invstd = self._forward()
        if not plain:
            pre = y + self.wide("residual")  # the ReLU's input
            if op == BOTH and mask is None:
                self.pre = pre  # where it is near 0, see errors()
                self._statistics = mean, invstd, x.size // x.shape[self.axis]
                y = np.maximum(pre, 0)
            else:
                y = np.maximum(pre, 0, out=pre)
        if op == FORWARD:
            result = (y,)
        else:
            dy = self.wide("dy")
            if not plain:
                dy *= (y > 0) if mask is None else mask
            dx, dgamma, dbeta = _naive.backward(dy, x, mean, invstd, self.wide("gamma"),
                                                self.axis, True)
            result = (y, dx, dgamma, dbeta) + (() if plain else (dy,))
        if mask is None:
            self._references[key] = result
        return result

    def remasked(self, expected, mask):
        """The fused backward's reference ``expected`` taken with the ReLU's mask ``mask``
        instead of its own ``y > 0``: what ``reference(BOTH, mask=mask)`` computes, but from the
        elements whose mask differs only. The backward is linear in the masked dy, so dx changes
        by the backward of the difference: at those elements, and by a per-channel term on their
        channels; dgamma, dbeta and the residual's gradient by their terms."""
        y, dx, dgamma, dbeta, dresidual = expected
        where = np.nonzero(mask != (y > 0))
        channel = where[self.axis % y.ndim]
        x = self.case.host["x"]
        dy = self.case.host["dy"][where].astype(np.float64)
        delta = dy * np.where(mask[where], 1.0, -1.0)  # the new masked dy less the old
        mean, invstd, count = self._statistics
        scale = self.wide("gamma") * invstd
        xhat = (x[where] - mean[channel]) * invstd[channel]
        dbeta_delta = np.bincount(channel, delta, minlength=len(mean))
        dgamma_delta = np.bincount(channel, delta * xhat, minlength=len(mean))
        dresidual, dx = dresidual.copy(), dx.copy()
        dresidual[where] += delta
        dx[where] += scale[channel] * delta
        for c in np.unique(channel):
            plane = np.moveaxis(dx, self.axis, 0)[c]  # a view: dx changes
            xhat = (np.moveaxis(x, self.axis, 0)[c] - mean[c]) * invstd[c]
            plane -= scale[c] * (dbeta_delta[c] + xhat * dgamma_delta[c]) / count
        return y, dx, dgamma + dgamma_delta, dbeta + dbeta_delta, dresidual

    def errors(self, op, result, plain=False):
        """``{output: error}``: max|actual - reference| over max(1, max|reference|).

        Where the ReLU's input lies within rounding of 0, the computed ``y > 0`` may fall either
        side of the float64 one; if the result's mask differs from the reference's only there,
        its backward is checked against the reference with its own mask (:meth:`remasked`)."""
        names = (PLAIN_OUTPUTS if plain else OUTPUTS)[op]
        if len(result) != len(names):
            raise ValueError(f"{len(result)} outputs, expected {len(names)}")
        expected = self.reference(op, plain)
        if op == BOTH and not plain:
            ours, theirs = np.asarray(result[0]) > 0, expected[0] > 0
            flipped = ours != theirs
            if flipped.any():
                band = TOLERANCE[self.x.dtype] / 10 * max(1.0, float(np.abs(self.pre).max()))
                if np.abs(self.pre[flipped]).max() <= band:  # else y fails the check below
                    expected = self.remasked(expected, ours)
        errors = {}
        for name, actual, wanted in zip(names, result, expected, strict=True):
            actual = np.asarray(actual)
            if actual.shape != wanted.shape:
                raise ValueError(f"{name} has shape {actual.shape}, expected {wanted.shape}")
            scale = max(1.0, float(np.max(np.abs(wanted))))
            errors[name] = float(np.max(np.abs(actual - wanted))) / scale
        return errors


@pytest.fixture(scope="module")
def cases(request):
    """``cases(layout, shape)``: that shape's FusedCase, built once; only the latest is kept."""
    dtype = np.dtype(request.config.getoption("bench_dtype"))
    current = {}

    def get(layout, shape):
        key = layout.name, shape
        if key not in current:
            current.clear()  # free the last shape's arrays (up to a few hundred MB each) first
            current[key] = FusedCase(layout, shape, dtype)
        return current[key]

    yield get
    current.clear()


# -- the implementations: each returns the call to time -------------------------------------


def _fastbn_fused(c, op):
    x, r, dy, gamma, beta, axis = c.x, c.residual, c.dy, c.gamma, c.beta, c.axis
    y, dx, dresidual = c.y, c.dx, c.dresidual
    mean, var = c.case.running()

    def forward():
        return fastbn.forward(x, gamma, beta, axis=axis, running_mean=mean, running_var=var,
                              momentum=MOMENTUM, eps=EPS, out=y, residual=r,
                              activation="relu")

    if op == FORWARD:
        return lambda: (forward()[0],)

    def both():
        out, stats = forward()
        grads = fastbn.backward(dy, x, stats, gamma, axis=axis, activation="relu", y=out,
                                dresidual=dresidual, out=dx)
        return (out, *grads, dresidual)
    return both


def _fastbn_unfused(c, op):
    x, r, dy, gamma, beta, axis = c.x, c.residual, c.dy, c.gamma, c.beta, c.axis
    y, dx, dresidual, mask = c.y, c.dx, c.dresidual, c.mask
    mean, var = c.case.running()

    def forward():
        out, stats = fastbn.forward(x, gamma, beta, axis=axis, running_mean=mean,
                                    running_var=var, momentum=MOMENTUM, eps=EPS, out=y)
        np.add(out, r, out=out)
        np.maximum(out, 0, out=out)
        return out, stats

    if op == FORWARD:
        return lambda: (forward()[0],)

    def both():
        out, stats = forward()
        np.greater(out, 0, out=mask)  # the fastest of the NumPy masks tried (np.where, copyto)
        np.multiply(dy, mask, out=dresidual)
        grads = fastbn.backward(dresidual, x, stats, gamma, axis=axis, out=dx)
        return (out, *grads, dresidual)
    return both


def _fastbn_plain(c, op):
    x, dy, gamma, beta, axis, y, dx = c.x, c.dy, c.gamma, c.beta, c.axis, c.y, c.dx
    mean, var = c.case.running()

    def forward():
        return fastbn.forward(x, gamma, beta, axis=axis, running_mean=mean, running_var=var,
                              momentum=MOMENTUM, eps=EPS, out=y)

    if op == FORWARD:
        return lambda: (forward()[0],)

    def both():
        out, stats = forward()
        return (out, *fastbn.backward(dy, x, stats, gamma, axis=axis, out=dx))
    return both


def _torch(c, op):
    try:
        import torch
    except ImportError:
        pytest.skip('PyTorch is not installed (pip install -e ".[bench]")')
    torch.set_num_threads(numba.get_num_threads())
    aten = torch.ops.aten

    def tensor(a):  # a zero-copy view, channels on axis 1 (channels_last memory for NHWC)
        return torch.from_numpy(a).movedim(c.axis, 1)

    x, r, dy = tensor(c.x), tensor(c.residual), tensor(c.dy)
    gamma, beta = torch.from_numpy(c.gamma), torch.from_numpy(c.beta)
    mean, var = (torch.from_numpy(a) for a in c.case.running())

    def numpy(t):
        return t.movedim(1, c.axis).numpy() if t.ndim == x.ndim else t.numpy()

    def forward():
        y, saved_mean, saved_invstd = aten.native_batch_norm(x, gamma, beta, mean, var, True,
                                                             MOMENTUM, EPS)
        y.add_(r)
        y.relu_()
        return y, saved_mean, saved_invstd

    def to_numpy(result):  # PyTorch's tensors, as arrays in x's layout
        return tuple(map(numpy, result))

    if op == FORWARD:
        return (lambda: (forward()[0],)), to_numpy

    def both():
        y, saved_mean, saved_invstd = forward()
        masked = aten.threshold_backward(dy, y, 0)  # dy where y > 0, else 0: ReLU's backward
        dx, dgamma, dbeta = aten.native_batch_norm_backward(
            masked, x, gamma, mean, var, saved_mean, saved_invstd, True, EPS, [True] * 3)
        return y, dx, dgamma, dbeta, masked
    return both, to_numpy


def _copy(kind):
    def make(c, op):
        call = c.case.memcpy() if kind == "memcpy" else c.case.threaded_copy()
        return lambda: (call(), c.case.out)[1:]
    return make


def _arrays(make):
    """``make``, whose calls return NumPy arrays, as a maker of ``(call, to_numpy)``."""
    return lambda c, op: (make(c, op), tuple)


# Each makes ``(call, to_numpy)``: the call to time, which returns a tuple of outputs, and what
# turns that tuple into NumPy arrays in x's layout.
IMPLEMENTATIONS = {"fastbn-fused": _arrays(_fastbn_fused),
                   "fastbn-unfused": _arrays(_fastbn_unfused), "torch": _torch,
                   "fastbn-plain": _arrays(_fastbn_plain),
                   "memcpy": _arrays(_copy("memcpy")), "copy": _arrays(_copy("copy"))}


def _check(result, c, op, impl):
    """Fail the benchmark, untimed, unless ``result`` agrees with the float64 reference."""
    if impl in COPIES:
        if not np.array_equal(result[0], c.x):
            pytest.fail(f"{impl}: the copy differs from x; not timed", pytrace=False)
        return
    try:
        errors = c.errors(op, result, plain=impl == "fastbn-plain")
    except ValueError as error:
        pytest.fail(f"{impl} {op}: {error}; not timed", pytrace=False)
    tolerance = TOLERANCE[c.x.dtype]
    for name, error in errors.items():
        if not error <= tolerance:  # NaN fails too
            pytest.fail(f"{impl} {op}: {name} differs from NumPy in float64 by {error:.1e} (max "
                        f"abs error / max(1, max|reference|)), more than {tolerance:.0e}; not "
                        f"timed", pytrace=False)


def test_fused(benchmark, cases, layout, shape, op, impl):
    c = cases(layout, shape)
    call, to_numpy = IMPLEMENTATIONS[impl](c, op)
    # The warm-up: compiles fastbn's kernels (or loads them from the cache), touches the pages.
    result = call()
    _check(to_numpy(result), c, op, impl)
    del result

    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    iterations = int(np.clip(2e-3 / max(once, 1e-7), 1, 1000))  # rounds of about 2 ms
    nbytes = MOVES[op] * c.x.nbytes
    rounds = int(np.clip(4e9 // (nbytes * iterations), 3, 25))  # a few GB per benchmark at most
    benchmark.group = f"fused|{op}|{layout.name}|{shape_name(shape)}"
    benchmark.extra_info.update(kind="fused", op=op, layout=layout.name,
                                shape=shape_name(shape), dtype=str(c.x.dtype), impl=impl,
                                bytes=nbytes, device="cpu", threads=numba.get_num_threads())
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=iterations)
