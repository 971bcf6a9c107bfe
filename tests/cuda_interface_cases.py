"""GPU cases for what the simulator does not show by itself: streams, the GPU a call runs on,
``__cuda_array_interface__`` producers (tests/fake_cuda.py), host synchronization and
allocations, and the production block sizes. Run with tests/cuda_cases.py by tests/test_cuda.py,
in a process of its own, on a GPU or under Numba's CUDA simulator.
"""
import functools
import re
import warnings
from fractions import Fraction

import numba
import numpy as np
import pytest
import reference
from _util import assert_close, each_mode, make_case, tol_for
from cuda_cases import small_gpu_blocks  # noqa: F401 - the same autouse fixture here
from fake_cuda import FakeCudaArray, new_stream
from numba import cuda
from numba.core.errors import NumbaPerformanceWarning

import fastbn
import fastbn.cuda
from fastbn._arrays import interface
from fastbn.cases import host, on_device

handle = fastbn.cuda._handle  # a stream's identity: its handle


class Recorder:
    """Records, while active, every kernel launch, copy between host and device, event and host
    synchronization fastbn makes, as ``(what, stream handle)``; and counts device allocations
    (their sizes in ``sizes``)."""

    def __init__(self, monkeypatch):
        self.log, self.allocations, self.sizes = [], 0, []
        self._monkeypatch, self.active = monkeypatch, False
        configured = fastbn.cuda._launcher  # launches, configured afresh or reused

        def launcher(kernel, grid, block, stream):
            launch = configured(kernel, grid, block, stream)

            def recorded(*args):
                self._note("launch", stream)
                return launch(*args)
            return recorded

        monkeypatch.setattr(fastbn.cuda, "_launcher", launcher)
        array_type = type(cuda.device_array(1))
        for method in ("copy_to_host", "copy_to_device"):
            self._wrap(array_type, method, lambda *args, stream=0, **kw: stream, method)
        self._wrap(fastbn.cuda.cuda, "to_device", lambda *args, stream=0, **kw: stream, "copy in")
        self._wrap(fastbn.cuda.cuda, "synchronize", lambda: "host", "synchronize")
        self._wrap(fastbn.cuda._SimulatedStream, "synchronize", lambda stream: stream,
                   "synchronize")
        self._wrap(fastbn.cuda.cuda, "device_array", None, "allocate")
        self._wrap(fastbn.cuda.cuda, "event", None, "event")

    def _note(self, what, stream):
        if self.active:
            self.log.append((what, "host" if stream == "host" else handle(stream)))

    def _wrap(self, owner, name, stream_of, what):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if stream_of is not None:
                self._note(what, stream_of(*args, **kwargs))
            elif self.active and what == "allocate":
                self.allocations += 1
                self.sizes.append(int(np.prod(args[0])))
            result = original(*args, **kwargs)
            return _RecordedEvent(result, self) if what == "event" else result
        self._monkeypatch.setattr(owner, name, wrapper)

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False

    def kinds(self):
        return {kind for kind, _ in self.log}

    def streams(self, what=None):
        return {stream for kind, stream in self.log if what is None or kind == what}


class _RecordedEvent:
    def __init__(self, event, recorder):
        self._event, self._recorder = event, recorder

    def record(self, stream=0):
        self._recorder._note("event recorded", stream)
        self._event.record(stream=stream)

    def wait(self, stream=0):
        self._recorder._note("event waited", stream)
        self._event.wait(stream=stream)


@pytest.fixture
def recorder(monkeypatch):
    return Recorder(monkeypatch)


def stream_of(a):
    """The handle of the stream a device array is bound to (0: none)."""
    return handle(a.stream)


DEFAULT = 1  # the legacy default stream's handle, which unbound Numba arrays are made on


# -- the bug: strided host running statistics with a CUDA x -------------------------------------


@each_mode
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_strided_host_running_statistics(training, dtype, rng):
    x, _, gamma, beta, rm, rv = make_case(rng, (5, 3, 8), 1, np.float64)
    rm_spread, rv_spread = np.zeros(6, dtype), np.zeros(6, dtype)
    rm_spread[::2], rv_spread[::2] = rm, rv
    y, stats = fastbn.forward(cuda.to_device(x), gamma, beta, training=training,
                              running_mean=rm_spread[::2], running_var=rv_spread[::2])
    ry, _, rinvstd, rrm, rrv = reference.forward(x, gamma, beta, 1, training, rm.astype(dtype),
                                                 rv.astype(dtype))
    assert_close(host(y), ry, 1e-10, "y")
    assert_close(host(stats.invstd), rinvstd, tol_for(dtype), "invstd")
    assert_close(rm_spread[::2], rrm, tol_for(dtype), "running_mean")
    assert_close(rv_spread[::2], rrv, tol_for(dtype), "running_var")
    assert not rm_spread[1::2].any() and not rv_spread[1::2].any(), "the gaps were written"


# -- __cuda_array_interface__ producers ---------------------------------------------------------


@pytest.mark.parametrize("strides", [None, "explicit"], ids=["strides None", "strides given"])
@each_mode
def test_interface_arrays_match_the_reference(strides, training, rng):
    x, dy, gamma, beta, rm, rv = make_case(rng, (6, 3, 10), 1, np.float32)
    fx, fdy = FakeCudaArray(x, strides), FakeCudaArray(dy, strides)
    fgamma, fbeta = FakeCudaArray(gamma, strides), FakeCudaArray(beta, strides)
    frm, frv = FakeCudaArray(rm, strides), FakeCudaArray(rv, strides)
    y, stats = fastbn.forward(fx, fgamma, fbeta, training=training, running_mean=frm,
                              running_var=frv)
    ry, rmean, rinvstd, rrm, rrv = reference.forward(x, gamma, beta, 1, training, rm, rv)
    tol = tol_for(np.float32)
    assert_close(host(y), ry, tol, "y")
    assert_close(frm.host(), rrm, 1e-12, "running_mean, updated in place through the interface")
    assert_close(frv.host(), rrv, 1e-12, "running_var")
    dx, dgamma, dbeta = fastbn.backward(fdy, fx, stats, fgamma, training=training)
    rdx, rdgamma, rdbeta = reference.backward(dy, x, rmean, rinvstd, gamma, 1, training)
    assert_close(host(dx), rdx, tol, "dx")
    assert_close(host(dgamma), rdgamma, tol, "dgamma")
    assert_close(host(dbeta), rdbeta, tol, "dbeta")
    assert_close(fx.host(), x, 0, "x is read, never written")


def test_strided_interface_running_statistics(rng):
    x, _, gamma, beta, rm, rv = make_case(rng, (6, 3, 10), 1, np.float64)
    frm, frv = FakeCudaArray(rm, every=2), FakeCudaArray(rv, every=2)
    fastbn.forward(FakeCudaArray(x), gamma, beta, running_mean=frm, running_var=frv)
    rrm, rrv = reference.forward(x, gamma, beta, 1, True, rm, rv)[3:]
    assert_close(frm.host(), rrm, 1e-12, "running_mean")
    assert_close(frv.host(), rrv, 1e-12, "running_var")
    assert not frm.base.copy_to_host()[1::2].any(), "the gaps were written"
    spread = FakeCudaArray(x.ravel(), every=2)
    spread.described.update(shape=x.shape, strides=tuple(2 * s for s in x.strides))
    with pytest.raises(ValueError, match=r"x .*must be C-contiguous"):
        fastbn.forward(spread)


def test_read_only_interface_arrays(rng):
    x, _, gamma, beta, rm, rv = make_case(rng, (4, 3, 9), 1, np.float64)
    fx = FakeCudaArray(x, read_only=True)
    frm, frv = FakeCudaArray(rm, read_only=True), FakeCudaArray(rv, read_only=True)
    y, _ = fastbn.forward(fx, gamma, beta, training=False, running_mean=frm, running_var=frv)
    assert_close(host(y), reference.forward(x, gamma, beta, 1, False, rm, rv)[0], 1e-10, "y")
    out = FakeCudaArray(np.zeros_like(x), read_only=True)
    with pytest.raises(ValueError, match="out is read-only"):
        fastbn.forward(fx, gamma, beta, out=out)
    with pytest.raises(ValueError, match="running_mean .*read-only"):
        fastbn.forward(fx, gamma, beta, running_mean=frm, running_var=frv)
    for fake, values in ((out, np.zeros_like(x)), (frm, rm), (frv, rv), (fx, x)):
        assert fake.host().tobytes() == values.tobytes(), "a refused call wrote an argument"


@each_mode
def test_fused_interface_arrays(training, recorder, rng):
    """The fused residual add and ReLU with a residual, and a dresidual written, through
    ``__cuda_array_interface__`` producers; another producer's stream on the residual is waited
    for on the device like x's."""
    x, dy, gamma, beta, rm, rv = make_case(rng, (5, 3, 8), 1, np.float32)
    residual = rng.uniform(-1.5, 1.5, x.shape).astype(np.float32)
    alive, number = new_stream()
    other_alive, other = (None, 8765) if numba.config.ENABLE_CUDASIM else new_stream()
    fx, fdy = FakeCudaArray(x, stream=number), FakeCudaArray(dy)
    fresidual = FakeCudaArray(residual, stream=other)
    fdresidual = FakeCudaArray(np.zeros_like(dy), strides="explicit")
    with recorder:
        y, stats = fastbn.forward(fx, gamma, beta, training=training, running_mean=rm.copy(),
                                  running_var=rv.copy(), residual=fresidual, activation="relu")
    assert recorder.log[:2] == [("event recorded", other), ("event waited", number)], (
        "the residual's producer is waited for on x's stream", recorder.log)
    assert recorder.streams("launch") == {number}
    ry, rmean, rinvstd, _, _ = reference.forward(x, gamma, beta, 1, training, rm, rv)
    ry = np.maximum(ry + residual, 0.0)
    tol = tol_for(np.float32)
    assert_close(host(y), ry, tol, "y")
    dx, _, dbeta = fastbn.backward(fdy, fx, stats, gamma, training=training, activation="relu",
                                   y=y, dresidual=fdresidual)
    g = np.where(host(y) > 0, dy.astype(np.float64), 0.0)
    rdx, _, rdbeta = reference.backward(g, x, rmean, rinvstd, gamma, 1, training)
    assert_close(host(dx), rdx, tol, "dx")
    assert_close(host(dbeta), rdbeta, tol, "dbeta")
    assert fdresidual.host().tobytes() == g.astype(np.float32).tobytes(), "dresidual"
    assert fresidual.host().tobytes() == residual.tobytes(), "the residual is read only"
    del alive, other_alive


# -- streams ------------------------------------------------------------------------------------


def _ops(rng):
    """``{name: op(stream) -> device arrays it returns}`` on one case: every public function
    that runs on the GPU, with host and device parameters, host and device running statistics."""
    x, dy, gamma, beta, rm, rv = make_case(rng, (5, 3, 12), 1, np.float32)
    xd, dyd, gd, bd, rmd, rvd = on_device(x, dy, gamma.astype(np.float32), beta, rm, rv)
    stats = fastbn.forward(xd)[1]
    total = fastbn.moments(x)

    def layer(stream):
        bn = fastbn.BatchNorm(3, stream=stream)
        y = bn(xd)
        return y, bn.backward(dyd)

    return {
        "train forward, host parameters and statistics": lambda s: fastbn.forward(
            xd, gamma, beta, running_mean=rm.copy(), running_var=rv.copy(), stream=s),
        "train forward, device ones": lambda s: fastbn.forward(
            xd, gd, bd, running_mean=rmd, running_var=rvd, stream=s),
        "train forward, no parameters": lambda s: fastbn.forward(xd, stream=s),
        "eval forward": lambda s: fastbn.forward(xd, gd, None, training=False, running_mean=rm,
                                                 running_var=rv, stream=s),
        "eval forward, device statistics": lambda s: fastbn.forward(
            xd, training=False, running_mean=rmd, running_var=rvd, stream=s),
        "train backward": lambda s: fastbn.backward(dyd, xd, stats, gd, stream=s),
        "eval backward": lambda s: fastbn.backward(dyd, xd, stats, training=False, stream=s),
        "moments": lambda s: fastbn.moments(xd, stream=s),
        "normalize": lambda s: fastbn.normalize(xd, total, gd, bd, running_mean=rmd,
                                                running_var=rvd, stream=s),
        "NumPy arrays on the GPU": lambda s: fastbn.forward(x, gamma, beta, device="cuda",
                                                            stream=s),
        "BatchNorm layer": layer,
    }


def _device_results(result):
    """The device arrays among an op's results (nested tuples flattened)."""
    if isinstance(result, tuple):
        return [a for part in result for a in _device_results(part)]
    return [] if isinstance(result, np.ndarray) else [result]


def _hand_back(log, own):
    """The entries of ``log`` after its last launch: an event recorded on ``own`` and waited for
    on each producer's stream (checked), as the set of the streams that waited."""
    last = max(k for k, (what, _) in enumerate(log) if what == "launch")
    tail = [entry for entry in log[last + 1:] if entry[0].startswith("event")]
    if not tail:
        return set()
    assert tail[0] == ("event recorded", own), log
    assert all(what == "event waited" for what, _ in tail[1:]), log
    return {stream for _, stream in tail[1:]}


@pytest.mark.parametrize("given", ["numba stream", "integer handle", "__cuda_stream__",
                                   "cuda_stream", "ptr"])
def test_the_stream_reaches_every_launch_and_copy(given, recorder, rng):
    stream, number = new_stream()
    argument = {"numba stream": stream if stream is not None else cuda.stream(),
                "integer handle": number,
                "__cuda_stream__": type("S", (), {"__cuda_stream__": lambda self: (0, number)})(),
                "cuda_stream": type("T", (), {"cuda_stream": number})(),
                "ptr": type("P", (), {"ptr": number})()}[given]
    expected = handle(argument) if given == "numba stream" else number
    ops = _ops(rng)
    if given != "numba stream":  # every op once is enough; the other kinds of stream on one
        ops = {name: ops[name] for name in ("train forward, host parameters and statistics",
                                            "train backward")}
    for name, op in ops.items():
        op(argument)  # the first call of a size makes its constants: no stream for those
        recorder.log.clear()
        with recorder:
            results = op(argument)
        assert recorder.streams("launch") == {expected}, name
        events = {"event recorded", "event waited"}
        assert {s for what, s in recorder.log if what not in events} <= {expected}, (
            name, recorder.log)
        # Unbound inputs need no ordering; the backward ops' stats were made on the default
        # stream: the call waits for it, and it for the call's device results.
        if recorder.streams("event recorded"):
            assert recorder.log[:2] == [("event recorded", DEFAULT),
                                        ("event waited", expected)], (name, recorder.log)
            assert _hand_back(recorder.log, expected) == (
                {DEFAULT} if _device_results(results) else set()), (name, recorder.log)
        assert ("backward" in name) == (DEFAULT in recorder.streams()), (name, recorder.log)
        for a in _device_results(results):
            assert stream_of(a) == expected, f"{name}: a result is not bound to the stream"


def test_the_producers_stream_is_honoured(recorder, rng):
    x, dy, gamma, beta, _, _ = make_case(rng, (4, 3, 6), 1, np.float64)
    alive, number = new_stream()  # a real stream lives while the test uses its handle
    fx, fdy = FakeCudaArray(x, stream=number), FakeCudaArray(dy, stream=number)
    fastbn.forward(fx, gamma, beta)
    with recorder:
        y, stats = fastbn.forward(fx, gamma, beta)
        dx, dgamma, dbeta = fastbn.backward(fdy, fx, stats, gamma)
    assert recorder.streams("launch") == {number}
    assert recorder.streams() == {number}, recorder.log
    for a in (y, *stats, dx, dgamma, dbeta):
        assert stream_of(a) == number
    assert_close(host(y), reference.forward(x, gamma, beta, 1)[0], 1e-10, "y")

    # Another producer's stream is waited for on the device, and stream= wins over x's; the
    # producers' streams wait for the call's work (out and the running statistics written) when
    # the results are handed back.
    other_alive, other = (None, 8765) if numba.config.ENABLE_CUDASIM else new_stream()
    mine = cuda.stream()
    fgamma = FakeCudaArray(gamma, stream=other)
    frm, frv = FakeCudaArray(np.zeros(3)), FakeCudaArray(np.ones(3))  # no stream key: ready
    out = FakeCudaArray(np.zeros_like(x), stream=number)
    recorder.log.clear()
    with recorder:
        y, _ = fastbn.forward(fx, fgamma, beta, stream=mine, out=out, running_mean=frm,
                              running_var=frv)
    assert recorder.streams("launch") == {handle(mine)}
    assert recorder.log[:4] == [("event recorded", number), ("event waited", handle(mine)),
                                ("event recorded", other), ("event waited", handle(mine))]
    assert _hand_back(recorder.log, handle(mine)) == {number, other}
    assert y is out
    assert_close(out.host(), reference.forward(x, gamma, beta, 1)[0], 1e-10, "out")
    del alive, other_alive


@pytest.mark.parametrize("key", [1, 2], ids=["legacy", "per-thread"])
def test_interface_stream_keys_of_the_default_streams(key, recorder, rng):
    """Streams 1 and 2 of the interface (CUDA's legacy and per-thread default streams) are
    streams like any other: the call runs on them and its results name them."""
    x, _, gamma, beta, _, _ = make_case(rng, (4, 3, 6), 1, np.float64)
    fx = FakeCudaArray(x, stream=key)
    fastbn.forward(fx, gamma, beta)
    with recorder:
        y, stats = fastbn.forward(fx, gamma, beta)
    assert recorder.streams() == {key}, recorder.log
    assert stream_of(y) == key and stream_of(stats.mean) == key
    if not numba.config.ENABLE_CUDASIM:  # the simulator's arrays have no interface
        assert y.__cuda_array_interface__["stream"] == key
    assert_close(host(y), reference.forward(x, gamma, beta, 1)[0], 1e-10, "y")
    with pytest.raises(ValueError, match="x's __cuda_array_interface__ names stream 0"):
        fastbn.forward(FakeCudaArray(x, stream=0))


def test_the_common_path_waits_for_nothing_and_allocates_once(recorder, rng):
    """CUDA inputs, device parameters and statistics: no copy, no synchronization, and one
    scratch allocation besides the results."""
    x, dy, gamma, beta, rm, rv = make_case(rng, (6, 3, 10), 1, np.float32)
    xd, dyd, gd, bd, rmd, rvd = on_device(x, dy, gamma.astype(np.float32), beta, rm, rv)
    for gamma_d, beta_d in ((gd, bd), (None, None)):
        stats = fastbn.forward(xd, gamma_d, beta_d)[1]
        calls = {"train forward": (fastbn.forward, (xd, gamma_d, beta_d),
                                   {"running_mean": rmd, "running_var": rvd}),
                 "eval forward": (fastbn.forward, (xd, gamma_d, beta_d),
                                  {"training": False, "running_mean": rmd, "running_var": rvd}),
                 "backward": (fastbn.backward, (dyd, xd, stats, gamma_d), {})}
        for name, (op, args, options) in calls.items():
            call = functools.partial(op, *args, **options)
            call()  # the first call of a size makes its constants
            recorder.log.clear()
            recorder.allocations = 0
            with recorder:
                results = call()
            assert recorder.kinds() == {"launch"}, (name, recorder.log)
            assert recorder.streams() == {DEFAULT}, (name, recorder.log)
            assert recorder.allocations == (3 if name == "backward" else 2), (
                f"{name}: the results (dgamma and dbeta together) and one scratch allocation")
            for a in _device_results(results):
                assert stream_of(a) == DEFAULT, f"{name}: a result does not name its stream"


def test_big_per_piece_parts_are_not_kept_by_the_statistics(recorder, rng):
    """With many pieces per channel, the reductions' per-piece parts get an allocation of their
    own, and the scratch that the returned statistics are cut from holds only vectors."""
    outer = fastbn.cuda.SEGMENT * (fastbn.cuda.FEW_PIECES + 2)
    x = make_case(rng, (outer, 3), 1, np.float64)[0]
    xd = cuda.to_device(x)
    pieces = fastbn.cuda._pieces((outer, 3, 1))[2]
    assert pieces > fastbn.cuda.FEW_PIECES
    fastbn.forward(xd)  # the first call of a size makes its constants
    with recorder:
        y, stats = fastbn.forward(xd)
    assert sorted(recorder.sizes) == sorted([x.size, 12 * 3, 3 * pieces * 3]), recorder.sizes
    ry, _, rinvstd = reference.forward(x)[:3]
    assert_close(host(y), ry, 1e-10, "y")
    assert_close(host(stats.invstd), rinvstd, 1e-10, "invstd")


def test_stream_argument_errors(rng):
    x, _, gamma, beta, rm, rv = make_case(rng, (4, 3, 5), 1, np.float32)
    xd, rmd, rvd = on_device(x, rm, rv)
    for bad, error, message in (("default", TypeError, "stream must be a CUDA stream"),
                                (2.0, TypeError, "got float"), (True, TypeError, "got bool"),
                                (-1, ValueError, "stream handle")):
        with pytest.raises(error, match=message):
            fastbn.forward(xd, gamma, beta, running_mean=rmd, running_var=rvd, stream=bad)
    assert host(rmd).tobytes() == rm.tobytes() and host(rvd).tobytes() == rv.tobytes()


def test_the_default_stream_is_named(monkeypatch, recorder, rng):
    """stream=0, or none given or named: the legacy default stream (the per-thread one where
    numba.cuda is configured so), which the results name, so that a consumer orders after them:
    a later call on another stream waits for it, and it for that call."""
    x = make_case(rng, (4, 3, 5), 1, np.float32)[0]
    xd = cuda.to_device(x)
    for stream in (0, None):
        y, stats = fastbn.forward(xd, stream=stream)
        assert stream_of(y) == DEFAULT and stream_of(stats.invstd) == DEFAULT
    mine = cuda.stream()
    fastbn.forward(y, stream=mine)
    recorder.log.clear()
    with recorder:
        z = fastbn.forward(y, stream=mine)[0]
    assert recorder.log[:2] == [("event recorded", DEFAULT), ("event waited", handle(mine))]
    assert _hand_back(recorder.log, handle(mine)) == {DEFAULT}
    assert stream_of(z) == handle(mine)
    assert_close(host(z), reference.forward(reference.forward(x)[0])[0], 1e-5, "z")
    monkeypatch.setattr(fastbn.cuda, "_per_thread_default", lambda: True)
    y, stats = fastbn.forward(cuda.to_device(host(xd)))
    assert stream_of(y) == 2 and stream_of(stats.invstd) == 2
    if not numba.config.ENABLE_CUDASIM:
        assert y.__cuda_array_interface__["stream"] == 2


# -- the GPU a call runs on ----------------------------------------------------------------------


def test_choose_gpu():
    assert fastbn.cuda.choose_gpu({}) is None
    assert fastbn.cuda.choose_gpu({"x": None, "out": None}) is None
    assert fastbn.cuda.choose_gpu({"x": 1, "gamma": None, "dy": 1}) == 1
    with pytest.raises(ValueError, match="x on GPU 0, dy on GPU 2; copy them"):
        fastbn.cuda.choose_gpu({"x": 0, "out": None, "dy": 2})


def test_a_call_runs_where_its_arrays_live(monkeypatch, rng):
    """Two GPUs seen: fastbn._pointer_gpu asks the driver (the seam _ordinal_of, a stand-in
    here, as one machine has one GPU) for every array with memory, and never for a null
    pointer."""
    x, _, gamma, _, rm, rv = make_case(rng, (4, 3, 5), 1, np.float64)
    fx, fgamma = FakeCudaArray(x), FakeCudaArray(gamma)
    frm, frv = FakeCudaArray(rm), FakeCudaArray(rv)
    pointer = interface(fgamma.base)["data"][0]
    asked = []

    def ordinal_of(p):
        asked.append(p)
        return 1 if p == pointer else 0

    monkeypatch.setattr(fastbn.cuda, "_gpu_count", lambda: 2)
    monkeypatch.setattr(fastbn.cuda, "_ordinal_of", ordinal_of)
    with pytest.raises(ValueError, match=r"one GPU, got x on GPU 0, gamma on GPU 1, "
                                         r"running_mean on GPU 0"):
        fastbn.forward(fx, fgamma, running_mean=frm, running_var=frv)
    assert pointer in asked and 0 not in asked
    assert frm.host().tobytes() == rm.tobytes() and frv.host().tobytes() == rv.tobytes()
    stats = fastbn.BatchStats(*on_device(np.zeros(3), np.ones(3)))
    with pytest.raises(ValueError, match="x on GPU 0, gamma on GPU 1"):
        fastbn.backward(fx, fx, stats, fgamma)
    assert fastbn.cuda._pointer_gpu(0) is None, "an empty array lives nowhere"

    monkeypatch.setattr(fastbn.cuda, "_ordinal_of", lambda p: 1)
    assert fastbn.cuda.for_call(x=fx, gamma=fgamma).gpu == 1, "the GPU that holds the data"
    monkeypatch.setattr(fastbn.cuda, "_ordinal_of", lambda p: 0)
    assert fastbn.cuda.for_call(x=fx, gamma=fgamma).gpu is None, "the current GPU: no switch"


def test_the_driver_names_the_gpu_of_a_pointer():
    """The real query (numba-cuda's driver API, or numba's ctypes one): on a GPU, it names the
    current GPU for memory made there; under the simulator, its names resolve on the installed
    numba (tests/test_cuda.py calls it without the simulator too)."""
    if numba.config.ENABLE_CUDASIM:
        with pytest.raises(ImportError, match="enums"):  # the simulator has no driver
            fastbn.cuda._ordinal_query()
        return
    pointer = interface(cuda.device_array(4))["data"][0]
    assert fastbn.cuda._ordinal_of(pointer) == cuda.get_current_device().id


# -- noise --------------------------------------------------------------------------------------


try:  # numba-cuda's warning: a class of its own, not numba.core.errors'
    from numba.cuda.core.errors import NumbaPerformanceWarning as CudaCoreWarning
except ImportError:  # numba's own numba.cuda: a stand-in of the same kind
    class CudaCoreWarning(Warning):
        """numba-cuda's numba.cuda.core.errors.NumbaPerformanceWarning."""


def test_low_occupancy_warnings_are_silenced_for_fastbn_only(monkeypatch, rng):
    """Configured as numba.cuda does on a GPU (a launch configuration that warns when made, and
    is reused): neither class of the warning escapes fastbn's launches, someone else's launch
    still warns, and once configured fastbn's calls never touch the warnings filters."""
    kernel_type = type(fastbn.cuda._cast)
    configure = kernel_type.__getitem__
    counts = {"configured": 0, "launched": 0, "catch_warnings": 0}

    class Configured:
        def __init__(self, kernel, configuration):
            counts["configured"] += 1
            grid = configuration[0] if isinstance(configuration[0], tuple) else (
                configuration[0],)
            message = (f"Grid size {int(np.prod(grid))} will likely result in GPU "
                       f"under-utilization due to low occupancy.")
            warnings.warn(NumbaPerformanceWarning(message))
            warnings.warn(CudaCoreWarning(message))
            self.kernel, self.configuration = kernel, configuration

        def __call__(self, *args):
            counts["launched"] += 1
            return configure(self.kernel, self.configuration)(*args)

    catch_warnings = warnings.catch_warnings

    def counted_catch_warnings(*args, **kwargs):
        counts["catch_warnings"] += 1
        return catch_warnings(*args, **kwargs)

    monkeypatch.setattr(kernel_type, "__getitem__", lambda kernel, c: Configured(kernel, c))
    monkeypatch.setattr(fastbn.cuda, "_REUSE_LAUNCHERS", True)
    monkeypatch.setattr(fastbn.cuda, "_launchers", {})
    x = make_case(rng, (4, 3, 5), 1, np.float32)[0]
    xd = cuda.to_device(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = fastbn.forward(xd)[1]
        fastbn.backward(xd, xd, stats)
        assert not caught, [str(w.message) for w in caught]
        assert counts["configured"] > 0
        monkeypatch.setattr(warnings, "catch_warnings", counted_catch_warnings)
        counts.update(configured=0, launched=0)
        y, stats = fastbn.forward(xd)
        fastbn.backward(xd, xd, stats)
        assert counts == {"configured": 0, "launched": counts["launched"], "catch_warnings": 0}
        assert counts["launched"] > 0, "the calls launched their reused configurations"
        assert_close(host(y), reference.forward(x)[0], tol_for(np.float32), "y")
        monkeypatch.setattr(warnings, "catch_warnings", catch_warnings)
        fastbn.cuda._cast[1, 1]  # someone else's launch still warns
    assert [w.category for w in caught] == [NumbaPerformanceWarning,
                                            CudaCoreWarning]
    pattern = re.compile(fastbn.cuda._LOW_OCCUPANCY)
    assert all(pattern.match(str(w.message)) for w in caught)


# -- the production block sizes -------------------------------------------------------------------


@pytest.mark.production_blocks
@pytest.mark.parametrize("shape,axis", [((2, 3, 7, 7), 1), ((3, 4, 4, 3), -1), ((70, 2), 1),
                                        ((40, 1), 1)],
                         ids=["NCHW 7x7", "NHWC C=3", "NxD C=2", "NxD C=1"])
@each_mode
def test_production_block_sizes(shape, axis, training, rng):
    for name, value in (("THREADS", 256), ("COLUMNS", 32), ("CHUNK", 1 << 15), ("TILE", 32)):
        assert getattr(fastbn.cuda, name) == value, f"{name} is not the production size"
    x, dy, gamma, beta, rm, rv = make_case(rng, shape, axis, np.float64, offset=1e4)
    xd, dyd, rmd, rvd = on_device(x, dy, rm, rv)
    y, stats = fastbn.forward(xd, gamma, beta, axis=axis, training=training, running_mean=rmd,
                              running_var=rvd)
    ry, rmean, rinvstd, rrm, rrv = reference.forward(x, gamma, beta, axis, training, rm, rv)
    assert_close(host(y), ry, 1e-10, "y")
    assert_close(host(rmd), rrm, 1e-10, "running_mean")
    assert_close(host(rvd), rrv, 1e-10, "running_var")
    assert_close(host(stats.invstd), rinvstd, 1e-10, "invstd")
    dx, dgamma, dbeta = fastbn.backward(dyd, xd, stats, gamma, axis=axis, training=training)
    rdx, rdgamma, rdbeta = reference.backward(dy, x, rmean, rinvstd, gamma, axis, training)
    assert_close(host(dx), rdx, 1e-10, "dx")
    assert_close(host(dgamma), rdgamma, 1e-10, "dgamma")
    assert_close(host(dbeta), rdbeta, 1e-10, "dbeta")


def _exact_moments(x, axis):
    """``(mean, M2)`` per channel of float64 ``x``, exactly (integer arithmetic on the values'
    binary fractions), as Fractions."""
    rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    n = rows.shape[0]
    means, m2s = [], []
    for column in rows.T:
        ratios = [v.as_integer_ratio() for v in column.tolist()]
        scale = max(den for _, den in ratios)
        values = [num * (scale // den) for num, den in ratios]
        total, squares = sum(values), sum(v * v for v in values)
        means.append(Fraction(total, n * scale))
        m2s.append(Fraction(n * squares - total * total, n * scale * scale))
    return means, m2s


@pytest.mark.production_blocks
@pytest.mark.parametrize("shape", [(700, 2, 7, 7), (2048, 32, 1)], ids=["planar", "rows"])
def test_production_block_sizes_with_many_values_per_thread(shape, rng):
    """Moments at the production block sizes on shapes that give each thread several tiles of
    values (and each channel two pieces): against exact rational arithmetic."""
    x = make_case(rng, shape, 1, np.float64, offset=1e4)[0]
    planar, piece, pieces = fastbn.cuda._pieces((shape[0], shape[1], int(np.prod(shape[2:]))))
    lanes = fastbn.cuda.THREADS // (1 if planar else min(fastbn.cuda.COLUMNS, shape[1]))
    assert pieces == 2 and piece // lanes >= 3 * fastbn.cuda.TILE, "several tiles per thread"
    total = fastbn.moments(cuda.to_device(x))
    means, m2s = _exact_moments(x, 1)
    for c, (mean, m2) in enumerate(zip(means, m2s)):
        assert abs(Fraction(total.mean[c]) - mean) <= Fraction(1, 10**15) * abs(mean), c
        assert abs(Fraction(total.m2[c]) - m2) <= Fraction(1, 10**14) * m2, (c, total.m2[c],
                                                                              float(m2))


# -- the normalization family through the public API --------------------------------------------


FAMILY_CALLS = {
    "layer": (lambda x, g, b, **o: fastbn.layer_norm(x, (4, 5), g, b, **o),
              lambda dy, x, s, g, **o: fastbn.layer_norm_backward(dy, x, s, (4, 5), g, **o),
              (4, 5)),
    "rms": (lambda x, g, b, **o: fastbn.rms_norm(x, 5, g, **o),
            lambda dy, x, s, g, **o: fastbn.rms_norm_backward(dy, x, s, 5, g, **o) + (None,),
            (5,)),
    "group": (lambda x, g, b, **o: fastbn.group_norm(x, 2, g, b, **o),
              lambda dy, x, s, g, **o: fastbn.group_norm_backward(dy, x, s, 2, g, **o), (6,)),
    "instance": (lambda x, g, b, **o: fastbn.instance_norm(x, g, b, **o),
                 lambda dy, x, s, g, **o: fastbn.instance_norm_backward(dy, x, s, g, **o), (6,)),
}


@pytest.mark.parametrize("name", list(FAMILY_CALLS))
@pytest.mark.parametrize("where", ["device arrays", "interface arrays", "numpy, device='cuda'"])
def test_family_on_the_gpu_matches_the_cpu(name, where, rng):
    forward, backward, parameter_shape = FAMILY_CALLS[name]
    x = (rng.standard_normal((3, 6, 4, 5)) + 2).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = rng.uniform(0.5, 2, parameter_shape).astype(np.float32)
    beta = rng.uniform(-1, 1, parameter_shape).astype(np.float32)
    y, stats = forward(x, gamma, beta)
    grads = backward(dy, x, stats, gamma)
    if where == "device arrays":
        put, options = cuda.to_device, {}
    elif where == "interface arrays":
        put, options = FakeCudaArray, {}
    else:
        put, options = (lambda a: a), {"device": "cuda"}
    gy, gstats = forward(put(x), put(gamma), put(beta), **options)
    assert_close(host(gy), y, 1e-5, "y")
    assert_close(host(gstats.invstd), stats.invstd, 1e-6, "invstd")
    if stats.mean is None:
        assert gstats.mean is None
    else:
        assert_close(host(gstats.mean), stats.mean, 1e-6, "mean")
    if where == "numpy, device='cuda'":
        assert isinstance(gy, np.ndarray) and isinstance(gstats.invstd, np.ndarray)
    ggrads = backward(put(dy), put(x), gstats, put(gamma), **options)
    for name_, ours, theirs in zip(("dx", "dgamma", "dbeta"), ggrads, grads):
        if theirs is None:
            continue
        assert host(ours).dtype == theirs.dtype and host(ours).shape == theirs.shape, name_
        assert_close(host(ours), theirs, 1e-5, name_)


def test_family_instance_norm_running_statistics_on_the_gpu(rng):
    x = (rng.standard_normal((3, 4, 10)) + 1).astype(np.float32)
    rm, rv = rng.uniform(-1, 1, 4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    cpu_rm, cpu_rv = rm.copy(), rv.copy()
    fastbn.instance_norm(x, running_mean=cpu_rm, running_var=cpu_rv, momentum=0.2)
    drm, drv = cuda.to_device(rm), cuda.to_device(rv)
    fastbn.instance_norm(cuda.to_device(x), running_mean=drm, running_var=drv, momentum=0.2)
    assert_close(drm.copy_to_host(), cpu_rm, 1e-6, "running_mean on the device")
    assert_close(drv.copy_to_host(), cpu_rv, 1e-6, "running_var on the device")
    host_rm, host_rv = rm.copy(), rv.copy()
    fastbn.instance_norm(cuda.to_device(x), running_mean=host_rm, running_var=host_rv,
                         momentum=0.2)
    assert_close(host_rm, cpu_rm, 1e-6, "running_mean on the host, x on the device")
    y, _ = fastbn.instance_norm(cuda.to_device(x), running_mean=drm, running_var=drv,
                                training=False)
    expected, _ = fastbn.instance_norm(x, running_mean=cpu_rm, running_var=cpu_rv,
                                       training=False)
    assert_close(host(y), expected, 1e-5, "eval with device running statistics")


def test_family_layer_on_the_gpu(rng):
    layer = fastbn.GroupNorm(2, 6)
    x = rng.standard_normal((3, 6, 7)).astype(np.float32)
    expected = layer(x)
    dx_expected = layer.backward(np.ones_like(x))
    got = layer(cuda.to_device(x))
    dx = layer.backward(cuda.to_device(np.ones_like(x)))
    assert_close(host(got), expected, 1e-5, "y")
    assert_close(host(dx), dx_expected, 1e-5, "dx")
    with pytest.raises(TypeError, match="gamma is a CUDA array"):
        fastbn.layer_norm(x, 7, cuda.to_device(np.ones(7, np.float32)))


def test_family_instance_norm_interface_running_statistics(rng):
    x = (rng.standard_normal((2, 3, 9)) + 1).astype(np.float32)
    rm, rv = rng.uniform(-1, 1, 3), rng.uniform(0.5, 2, 3)
    frm, frv = FakeCudaArray(rm.copy()), FakeCudaArray(rv.copy())
    y, _ = fastbn.instance_norm(FakeCudaArray(x), running_mean=frm, running_var=frv,
                                training=False)
    expected, _ = fastbn.instance_norm(x, running_mean=rm, running_var=rv, training=False)
    assert_close(host(y), expected, 1e-5, "eval with interface running statistics")
    fastbn.instance_norm(FakeCudaArray(x), running_mean=frm, running_var=frv)
    fastbn.instance_norm(x, running_mean=rm, running_var=rv)
    assert_close(frm.host(), rm, 1e-12, "running_mean updated through the interface")
    assert_close(frv.host(), rv, 1e-12, "running_var")
