"""Bitwise reproducibility: the same call twice, and across NUMBA_NUM_THREADS."""
import fastbn

from _util import CPU_SMALL_BLOCKS, each_dtype, each_layout, make_case, run_python


def _run_all(x, dy, gamma, beta, rm, rv, axis):
    rm, rv = rm.copy(), rv.copy()
    y, s = fastbn.forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
    dx, dg, db = fastbn.backward(dy, x, s, gamma, axis=axis)
    ye, se = fastbn.forward(x, gamma, beta, axis=axis, training=False, running_mean=rm,
                            running_var=rv)
    dxe, dge, dbe = fastbn.backward(dy, x, se, gamma, axis=axis, training=False)
    return [y, s.mean, s.invstd, rm, rv, dx, dg, db, ye, se.mean, se.invstd, dxe, dge, dbe]


@each_dtype
@each_layout
def test_same_call_twice_is_bitwise_identical(layout, dtype, rng):
    case = make_case(rng, layout.small, layout.axis, dtype)
    first = _run_all(*case, layout.axis)
    second = _run_all(*case, layout.axis)
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


SCRIPT = r"""
import hashlib, sys
import numpy as np
import numba
import fastbn, fastbn.cpu

CASES = [((8, 3, 64, 64), 1), ((64, 40, 40, 3), -1), ((300, 1100), 1), ((2, 5, 30000), 1),
         ((6, 24, 50), 1), ((3, 17, 20, 20), 1)]
SMALL = CPU_SMALL_BLOCKS
DEFAULTS = {k: getattr(fastbn.cpu, k)
            for k in dict(SMALL, FUSE_MIN=0, STREAM_MIN=0, STREAM_RUN=0)}

print("threads", numba.get_num_threads())
# "fused": planar training ops with FUSE_CHANNELS channels or more run fused (one work item per
# channel), and give the same bits whatever the thread count.
FUSED = dict(SMALL, FUSE_MIN=0)
# "streamed": every map writes with streaming stores.
STREAMED = dict(SMALL, STREAM_MIN=0, STREAM_RUN=0)
CONFIGS = {"default": DEFAULTS, "small": SMALL, "fused": FUSED, "streamed": STREAMED}
for blocks, sizes in CONFIGS.items():
    for k, v in DEFAULTS.items():
        setattr(fastbn.cpu, k, v)
    for k, v in sizes.items():
        setattr(fastbn.cpu, k, v)
    for shape, axis in CASES:
        for dtype in (np.float32, np.float64):
            rng = np.random.default_rng(12345)
            c = shape[axis]
            bshape = [1] * len(shape)
            bshape[axis] = c
            x = (rng.standard_normal(shape) * rng.uniform(0.5, 2, c).reshape(bshape)
                 + rng.uniform(-50, 50, c).reshape(bshape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            gamma, beta = rng.uniform(0.5, 2, c), rng.uniform(-1, 1, c)
            rm, rv = np.zeros(c), np.ones(c)
            y, s = fastbn.forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
            dx, dg, db = fastbn.backward(dy, x, s, gamma, axis=axis)
            ye, se = fastbn.forward(x, gamma, beta, axis=axis, training=False,
                                    running_mean=rm, running_var=rv)
            dxe, _, _ = fastbn.backward(dy, x, se, gamma, axis=axis, training=False)
            h = hashlib.sha256()
            for a in (y, s.mean, s.invstd, rm, rv, dx, dg, db, ye, dxe):
                h.update(np.ascontiguousarray(a).tobytes())
            print(blocks, shape, axis, np.dtype(dtype).name, h.hexdigest())
""".replace("CPU_SMALL_BLOCKS", repr(CPU_SMALL_BLOCKS))  # the tests' shrunk block sizes


def _hashes(threads):
    proc = run_python("-c", SCRIPT, env={"NUMBA_NUM_THREADS": str(threads)})
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"threads {threads}"
    return lines[1:]


def test_bitwise_identical_across_thread_counts():
    one = _hashes(1)
    assert len(one) == 4 * 6 * 2
    for threads in (2, 3):
        other = _hashes(threads)
        diff = [(a, b) for a, b in zip(one, other) if a != b]
        assert not diff, f"NUMBA_NUM_THREADS=1 vs {threads}: " + "; ".join(
            a.rsplit(" ", 1)[0] for a, _ in diff)


@each_dtype
@each_layout
def test_calling_thread_alone_gives_the_pool_bits(layout, dtype, rng, monkeypatch):
    """Small tensors run on the calling thread (PARALLEL_MIN): the same bits as the pool."""
    import fastbn.cpu
    case = make_case(rng, layout.small, layout.axis, dtype)
    monkeypatch.setattr(fastbn.cpu, "PARALLEL_MIN", 0)
    pooled = _run_all(*case, layout.axis)
    monkeypatch.setattr(fastbn.cpu, "PARALLEL_MIN", 10**12)
    alone = _run_all(*case, layout.axis)
    for a, b in zip(pooled, alone):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
