"""The CPU device: Numba-parallel per-channel reductions and affine maps, and the steps of batch norm.

Both device modules, this one and fastbn/cuda.py, expose the same steps, with the same names,
arguments and results, in this order; each works on the ``(outer, C, inner)`` view that
fastbn._layout builds, and per-channel vectors are float64 arrays of the device
(docs/design.md §2):

==================== ====================================================== =================
step                 function                                               returns
==================== ====================================================== =================
where arrays go      ``view(x, axis)``, ``operands(view, *arrays)``,        views, an output,
                     ``output(view, out, like)``, ``to_host(a)``,           vectors
                     ``per_channel(values, C, fill=None, copy=False)``
statistics           ``moments(x3)``                                        ``(s, δ, M2)``
training forward map ``forward_map(x3, y3, s, δ, M2, γ, β, eps)``           ``(μ, σ², invstd)``
map with statistics  ``normalize_with(x3, y3, μ, σ², γ, β, eps)``           ``invstd``
(eval, normalize)
gradient sums        ``gradient_sums(dy3, x3, μ)``                          ``(Σdy, Σdy·(x−μ))``
backward map         ``backward_map(dy3, x3, dx3, μ, invstd, γ, Σdy,        –
                     Σdy·(x−μ), count, training)``
parameter gradients  ``parameter_gradients(Σdy, Σdy·(x−μ), invstd, dtype)`` ``(dγ, dβ)``
running statistics   ``update_running(running_mean, running_var, μ, σ²,     –
                     momentum, unbias)``
family: statistics   ``group_forward(x3, y3, groups, γ, β, eps, centred)``  ``(μ, σ², invstd)``
and map (per row)                                                           per row
family: map with     ``group_normalize_with(x3, y3, groups, μ, invstd, γ,   –
statistics           β)``
family: backward     ``group_backward(dy3, x3, dx3, groups, μ, invstd, γ,   ``(dγ, dβ)``
                     training)``
vector dtype         ``cast(a, dtype)``                                     ``a`` in dtype
==================== ====================================================== =================

The family's steps (layer, group, instance and RMS norm) work on the ``(R, P, S)`` view of
fastbn._layout.GroupView instead: statistics per row over its P·S values, element (r, p, s) scaled
by parameter ``(r % groups)·P + p`` (docs/design.md §2.7).

The kernels come in two families (docs/design.md §2):

* planar (``inner >= PLANAR_RUN``): channel ``c`` is ``outer`` contiguous runs ``x[o, c, :]``, and
  loops run along a run;
* rows (channels-last and N×D, ``inner == 1``, and runs too short to vectorize): the view is read as
  ``outer`` rows of ``C·inner`` values (``_rows_of``), and loops run across a row.

Numerics (docs/design.md §3): all arithmetic is float64 whatever x's dtype. Statistics are taken of
``x − s``, with ``s`` one value of the channel, so that a large common offset never enters a sum.
Each chunk of a channel (planar) or tile of rows (rows) is reduced exactly, with two passes while
it sits in cache, and the pieces are merged with Chan et al.'s formula (``chan``, the one merge of
both devices) in a fixed order. Chunk boundaries depend on the shape and the block sizes below
only, never on the thread count, so results are bitwise reproducible.

Each step is one compiled call, built twice (``_Twin``): a parallel build whose kernels run on
Numba's thread pool, and a serial build for tensors too small to pay for waking it. The two cut
the work alike, so they give the same bits. ``batch_norm`` and ``batch_norm_backward`` run a whole
op in one compiled call, for the API's lean path (docs/design.md §4.3).

The block sizes are read at call time and passed to the compiled code (``_blocks``), so tests can
shrink them to run the multi-chunk paths on small shapes.
"""
import functools
import os
import threading
import types

import llvmlite.ir as llvm_ir
import numba
import numpy as np
from numba import njit, prange
from numba import types as nb_types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._layout import ChannelView

CHUNK = 8192  # planar: elements of one channel reduced exactly (two passes, in L1/L2); maps:
#               the longest run one work item writes, so that N = 1 still gives every core work
TILE_ROWS = 32  # rows: rows reduced in one pass about the tile's first row (see _rows_moments)
SEGMENT = 1 << 20  # rows: elements per parallel work item (bounds the partials buffer)
COLUMN_BLOCK = 4096  # rows: columns per work item. Rows up to this wide are read whole, so that a
#                      work item reads one stretch of memory (blocks of 512 columns, 2 KB pieces
#                      of many rows, left the prefetcher behind: the N×D 8192×4096 reductions
#                      took 1.4 times as long); the float64 accumulators, 96 KB, stay in L2
MIN_WORK_ITEMS = 16  # work items a tensor is cut into at the least, so that every core has work
FOLD_WIDTH = 64  # rows: rows narrower than this are read several at a time (_rows_of)
PARALLEL_MIN = 1 << 18  # work (values × the step's COST) under which a call runs on the calling
#                        thread. On two cores a batch-norm forward plus backward of 2^18 float32
#                        values takes about 0.3 ms serially and gains at most 1.5x on the pool;
#                        under it, waking the pool (and taking a core from NumPy's BLAS, which a
#                        training loop calls next) costs more than it saves (docs/threads.md)
FAMILY_COST = 4  # the family's rows kernels spend about 4 times batch norm's time per value
PLANAR_RUN = 32  # planar kernels need runs this long to pay; shorter ones are read as rows
FUSE_MIN = 1 << 23  # planar training ops on tensors of this many bytes or more run each channel
#                     in one work item (reduction, then the map while the channel is in cache),
FUSE_SLAB = 1 << 20  # when a channel holds at most this many bytes (it stays in L2: larger ones
#                      are read faster in memory order, unfused)
FUSE_CHANNELS = 16  # and the tensor has this many channels or more (a compile-time constant)
STREAM_MIN = 1 << 25  # planar maps write outputs of this many bytes or more with streaming stores
# (the L3's size here: larger outputs leave the cache before anyone reads them) ...
STREAM_RUN = 2048  # ... when their runs hold this many bytes or more

# Only the innermost sums of the planar reduction need reassociation (to vectorize). It lives in
# small helpers of its own: fast-math flags are per instruction, so the caller's compensated
# arithmetic, such as ((c + m) - c), is never simplified away.
_SUM_MATH = {"reassoc", "contract", "nsz"}
# The maps may fuse a·t + b into one rounding, nothing more.
_MAP_MATH = {"contract"}
_jit = dict(cache=True, nogil=True, error_model="numpy")
# Helpers called only from compiled kernels get no Python wrapper: less to compile on a cold start.
# (Calling one of them from Python would crash the interpreter.)
_helper = dict(_jit, no_cpython_wrapper=True)
# The paths only tensors larger than the cache take (the fused planar ops, streaming stores) are
# compiled into the parallel builds alone: a serial build runs tensors under PARALLEL_MIN, and
# in a forked child (SERIAL) larger ones, which then take the plain paths, with the same bits. A
# compile-time constant, False in the serial builds (``_Twin``), so that Numba prunes them there.
_LARGE_PATHS = True


# -- two builds of every step: on the thread pool, and on the calling thread -------------------
#
# Numba's threading layers differ (numba.readthedocs.io, "The Threading Layers"): tbb and omp
# accept parallel kernels from several threads at once, workqueue aborts the process when two
# threads launch at the same time, and GNU OpenMP's pool does not survive fork(): a child whose
# parent had started it is terminated at its first parallel kernel. So every call from Python
# goes through _Twin, under one of three policies:
PARALLEL = "parallel"  # tbb, omp: call the parallel build
LOCKED = "locked"  # workqueue: the same, one call at a time
SERIAL = "serial"  # a forked child of a process whose GNU OpenMP pool had started: the serial
#                    build (same chunks, same bits)
_policy = None  # chosen at the first call, when Numba starts its pool
_pool_lock = threading.Lock()

# GNU OpenMP's idle workers spin for 300,000 rounds (milliseconds here) after each parallel
# region before they sleep. In a training loop the next thing to run is NumPy's BLAS, whose
# threads then wait for the cores that Numba's spinning worker holds: a NumPy layer-norm loop ran
# 6 times slower (docs/threads.md). A short spin still joins the back-to-back regions of one op.
# libgomp reads this when it is loaded, which is when Numba first starts its pool: so it is set
# at import, and never over a value the user chose.
IDLE_SPIN = "2000"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _shorten_idle_spin(environ=os.environ):
    """Set ``GOMP_SPINCOUNT=IDLE_SPIN`` unless the user set either of WAIT_VARIABLES; returns
    whether it did."""
    if any(name in environ for name in WAIT_VARIABLES):
        return False
    environ["GOMP_SPINCOUNT"] = IDLE_SPIN
    return True


_shorten_idle_spin()


def execution_policy():
    """How the parallel builds run in this process: ``PARALLEL``, ``LOCKED`` or ``SERIAL``."""
    global _policy
    if _policy is None:
        numba.get_num_threads()  # starts Numba's pool, which settles the threading layer
        _policy = LOCKED if numba.threading_layer() == "workqueue" else PARALLEL
    return _policy


def _after_fork_in_child():
    global _policy, _pool_lock
    _pool_lock = threading.Lock()  # another thread of the parent may have held it at the fork
    try:
        layer = numba.threading_layer()
    except ValueError:  # the parent never started the pool: the child starts its own
        return
    if layer == "omp":
        from numba.np.ufunc import omppool
        if omppool.openmp_vendor == "GNU":
            _policy = SERIAL


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Twin:
    """A function compiled twice: ``parallel``, whose ``prange`` loops run on Numba's pool, and
    ``serial``, which runs on the calling thread. Same code, same chunks, so the same bits.

    A kernel (``_kernel``) holds the ``prange`` loops; a step (``_step``) calls kernels and other
    steps by their global names, and each of its builds calls the same build of those. Steps
    called from steps are inlined (in Numba's IR), so that only kernels are linked: Numba
    optimizes and compiles a linked function again in every function that links it, and steps
    nested three deep made a cold start about 1.4 times as long.
    """

    def __init__(self, py_func, kernel, options, cost=1):
        self._py_func, self._kernel, self._options, self._cost = py_func, kernel, options, cost
        self._builds = {}
        functools.update_wrapper(self, py_func)

    def _build(self, serial, inline=False):
        """The serial or parallel build, as called from Python, or, for a step called from
        another step, as inlined there (made once each)."""
        key = serial, inline
        if key not in self._builds:
            self._builds[key] = self._dispatcher(serial, inline)
        return self._builds[key]

    def _dispatcher(self, serial, inline):
        f = self._py_func
        names = f.__globals__
        twins = {name: names[name]._callee(serial)
                 for name in f.__code__.co_names if isinstance(names.get(name), _Twin)}
        if not (serial or twins or inline):
            return njit(parallel=self._kernel, **self._options)(f)
        # A copy under another name: Numba's disk cache is keyed by the function's name and
        # signature, not by `parallel` or by the functions it calls.
        copy = types.FunctionType(f.__code__, dict(names, _LARGE_PATHS=not serial, **twins),
                                  f.__name__, f.__defaults__, f.__closure__)
        copy.__qualname__ = (f.__qualname__ + ("_serial" if serial else "")
                             + ("_inline" if inline else ""))
        options = dict(self._options, inline="always") if inline else self._options
        return njit(**options)(copy)

    def _callee(self, serial):
        """This function's build as another step's build calls it."""
        return self._build(serial, inline=not self._kernel)

    @property
    def parallel(self):
        return self._build(serial=False)

    @property
    def serial(self):
        return self._build(serial=True)

    def build(self, size):
        """The build to run from Python for a tensor of ``size`` values: serial where its work
        (``size`` times the step's cost per value) is under PARALLEL_MIN (waking the pool costs
        more than it saves) or in a forked child, else parallel (one call at a time under
        LOCKED)."""
        policy = _policy or execution_policy()
        if size * self._cost < PARALLEL_MIN or policy is SERIAL:
            return self.serial
        return self._locked if policy is LOCKED else self.parallel

    def _locked(self, *args):
        with _pool_lock:
            return self.parallel(*args)

    def __call__(self, *args):
        """Run a step from Python, its first argument's size choosing the build."""
        return self.build(args[0].size)(*args)


def _kernel(py_func=None, **options):
    """A parallel kernel: only compiled steps call it."""
    if py_func is None:
        return lambda f: _kernel(f, **options)
    return _Twin(py_func, True, dict(_helper, **options))


def _step(py_func=None, cost=1):
    """A step: compiled code that calls kernels and steps, callable from Python. ``cost``: its
    time per value relative to batch norm's steps, for the choice of build."""
    if py_func is None:
        return lambda f: _step(f, cost)
    return _Twin(py_func, False, _jit, cost)


def _blocks():
    """The block sizes, as the compiled steps take them."""
    return (CHUNK, TILE_ROWS, SEGMENT, COLUMN_BLOCK, MIN_WORK_ITEMS, FOLD_WIDTH, PLANAR_RUN,
            FUSE_MIN, FUSE_SLAB, STREAM_MIN, STREAM_RUN, NORM_BLOCKS)


# -- merging per-piece results, and the coefficients of the maps ------------------------------


def chan(n, mean, m2, n_b, mean_b, m2_b):
    """Chan et al.'s merge: the moments of two disjoint pieces, from each piece's.

    An empty piece changes nothing. Plain Python, compiled here for the CPU and in fastbn.cuda for
    the GPU: one formula, so both devices merge alike.
    """
    if n_b == 0.0:
        return n, mean, m2
    if n == 0.0:
        return n_b, mean_b, m2_b
    total = n + n_b
    delta = mean_b - mean
    return total, mean + delta * (n_b / total), m2 + m2_b + delta * delta * (n * n_b / total)


_chan = njit(**_helper)(chan)


@njit(**_jit)
def merge(counts, means, m2s):
    """Merge per-piece moments ``(pieces, C)`` over pieces ``0, 1, ...``: ``(count, mean, M2)``."""
    pieces, channels = means.shape
    count = np.zeros(channels)
    mean = np.zeros(channels)
    m2 = np.zeros(channels)
    for j in range(pieces):  # pieces outer, channels inner: the merges vectorize across channels
        for c in range(channels):
            count[c], mean[c], m2[c] = _chan(count[c], mean[c], m2[c], counts[j, c], means[j, c],
                                             m2s[j, c])
    return count, mean, m2


@njit(**_helper)
def _chan_into(n, mean, m2, n_b, mean_b, m2_b):
    """``chan`` for every channel at once, in place: a non-empty piece of ``n_b`` values per
    channel (``mean_b``, ``m2_b``) merged into ``mean``, ``m2`` of ``n`` values each (copied when
    ``n`` is 0). The count ratios are computed once, as ``chan`` computes them, so the bits are
    chan's and the channel loop vectorizes (no division per channel). Returns ``n + n_b``."""
    if n == 0.0:
        for c in range(mean.size):
            mean[c], m2[c] = mean_b[c], m2_b[c]
        return n_b
    total = n + n_b
    share, weight = n_b / total, n * n_b / total
    for c in range(mean.size):
        delta = mean_b[c] - mean[c]
        mean[c] = mean[c] + delta * share
        m2[c] = m2[c] + m2_b[c] + delta * delta * weight
    return total


@njit(**_helper)
def _merge_pieces(counts, means, m2s):
    """``merge(...)[1:]`` of non-empty pieces whose count is the same for every channel,
    ``counts[j]``, merged in order with ``_chan_into``."""
    mean = np.empty(means.shape[1])
    m2 = np.empty(means.shape[1])
    n = 0.0
    for j in range(counts.size):
        n = _chan_into(n, mean, m2, counts[j], means[j], m2s[j])
    return mean, m2


@njit(**_jit)
def _add_partials(sums):
    """Sums ``(kinds, pieces, C)`` added over pieces ``0, 1, ...``: ``(kinds, C)``."""
    kinds, pieces, channels = sums.shape
    total = np.zeros((kinds, channels))
    for j in range(pieces):
        for k in range(kinds):
            for c in range(channels):
                total[k, c] += sums[k, j, c]
    return total


def _forward_coefficients(m2, count, gamma, beta, delta, eps):
    """``(invstd, a, b)`` of training forward's map ``y = a·(x − s) + b``, δ = μ − s."""
    invstd = 1.0 / np.sqrt(m2 / count + eps)
    a = gamma * invstd
    return invstd, a, beta - a * delta


def _backward_coefficients(sum_dy, sum_dy_xmu, count, gamma, invstd):
    """``(p, q, r)`` of training backward's map ``dx = p·dy + q·(x − μ) + r``."""
    p = gamma * invstd
    return p, -p * invstd * invstd * sum_dy_xmu / count, -p * sum_dy / count


_forward_coefficients_jit = njit(**_helper)(_forward_coefficients)
_backward_coefficients_jit = njit(**_helper)(_backward_coefficients)


# -- planar -----------------------------------------------------------------------------------


# The sums with reassociation work on one run each (a C-contiguous 1-D array), as they always
# have. A version that summed a whole chunk (rows and runs) in one helper gave other bits in the
# serial and the parallel builds (a forked child's Σdy differed from its parent's in the last
# bits, tests/test_concurrency.py): with reassociation the compiler picks the order of the sums,
# and it evidently picked differently where the helper was compiled into each build.


@njit(fastmath=_SUM_MATH, **_helper)
def _sum_minus(run, centre):
    s = 0.0
    for i in range(run.size):  # an index loop: Numba's array iterator does not vectorize
        s += run[i] - centre
    return s


@njit(fastmath=_SUM_MATH, **_helper)
def _sums_of_deviations(run, centre):
    s = 0.0
    ss = 0.0
    for i in range(run.size):
        d = run[i] - centre
        s += d
        ss += d * d
    return s, ss


@njit(fastmath=_SUM_MATH, **_helper)
def _sums_for_gradient(dy_run, x_run, mean, mask_run):
    s = 0.0
    sx = 0.0
    for i in range(dy_run.size):
        g = _gated(dy_run[i], mask_run, i)
        s += g
        sx += g * (x_run[i] - mean)
    return s, sx


# -- streaming stores ---------------------------------------------------------------------------
#
# A planar map whose output is larger than the cache writes it with non-temporal stores: a plain
# store first reads the line it writes into the cache (a third stream of memory traffic), and the
# line is evicted before anyone reads it. The stores are claimed 32-byte aligned, so that LLVM may
# vectorize them (x86 takes non-temporal vectors of up to 32 bytes, aligned), and each run streams
# whole lines from its first 64-byte boundary (``_streamed``). The values are those of plain
# stores: the bits do not change. The rows maps stream whole rows with 16-byte vectors
# (``_streams_rows``; docs/design.md §4.1 says what was measured).


def _streaming_store(align):
    """An intrinsic ``store(array, index, value)``: ``array[index] = value`` with a non-temporal
    store claimed ``align``-byte aligned, so that LLVM vectorizes it into stores of up to
    ``align`` bytes."""
    def typer(typingctx, array, index, value):
        if not (isinstance(array, nb_types.Array) and isinstance(index, nb_types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            array_type = signature.args[0]
            view = context.make_array(array_type)(context, builder, args[0])
            pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]],
                                               wraparound=False)
            value = context.cast(builder, args[2], signature.args[2], array_type.dtype)
            store = builder.store(value, pointer, align=align)
            store.set_metadata("nontemporal", builder.module.add_metadata(
                [llvm_ir.Constant(llvm_ir.IntType(32), 1)]))
            return context.get_dummy_value()

        return nb_types.void(array, index, value), codegen
    return intrinsic(typer)


_store_streaming = _streaming_store(32)  # from a 32-byte boundary (planar runs)
_store_streaming16 = _streaming_store(16)  # from a 16-byte boundary (rows)


@intrinsic
def _store_fence(typingctx):
    """A sequentially consistent fence (a locked instruction on x86, which orders streaming
    stores too): this thread's streaming stores, which are weakly ordered, reach memory before
    its later stores, so before the end of the parallel region that the caller waits for."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return nb_types.void(), codegen


@njit(**_helper)
def _streams(y3, blocks):
    """Whether a planar map writes ``y3`` with streaming stores: it is larger than the cache, and
    its runs are long enough to pay for their heads and tails."""
    return y3.size * y3.itemsize >= blocks[9] and y3.shape[2] * y3.itemsize >= blocks[10]


@njit(**_helper)
def _streams_rows(y, blocks):
    """Whether the rows maps write ``y`` (rows) with streaming stores: larger than the cache,
    rows of 64 values or more that all start on a 16-byte boundary. The stores are claimed
    16-byte aligned only: NumPy's large arrays start 16 bytes past a page (malloc's header), so
    32-byte claims would leave most float64 rows unstreamed; a float32 map stores 16-byte vectors
    anyway (its float64 coefficients per column set the vector width)."""
    return (y.size * y.itemsize >= blocks[9] and y.shape[1] >= 64
            and y.shape[1] * y.itemsize % 16 == 0 and y.ctypes.data % 16 == 0)


@njit(**_helper)
def _streamed(y_run):
    """The span ``[head, body)`` of ``y_run`` to stream: whole 64-byte lines from its first line
    boundary (none if its elements are misaligned)."""
    size = y_run.size
    address = y_run.ctypes.data
    if address % y_run.itemsize != 0:
        return size, size
    lane = 64 // y_run.itemsize
    head = min(size, (-(address // y_run.itemsize)) % lane)
    return head, head + (size - head) // lane * lane


# -- the fused epilogues (docs/design.md §1): a residual added after the forward map and a ReLU,
# and the ReLU's mask on dy before the backward's sums and map (dresidual written in its pass).
#
# An absent array or activation is None, and Numba compiles each combination of None and array
# apart, pruning the branches that test an argument of type None: the plain maps compile as
# before, to the same bits, and the fused ones read the residual or the mask in the pass that
# reads x anyway. The pieces of an array that may be absent are taken by overloads chosen by its
# type (``_absent_or``): a helper that tested ``a is None`` itself would return an Optional
# array, which Numba then tests at run time, element by element.


def _absent_or(take):
    """A function for compiled code: ``take(a, *args)``, or None when ``a`` is None (by type)."""
    def function(a, *args):
        raise NotImplementedError("compiled code only")

    @overload(function, jit_options=dict(_helper))
    def typed(a, *args):
        if isinstance(a, nb_types.NoneType):
            return lambda a, *args: None
        return lambda a, *args: take(a, *args)

    function.__doc__ = take.__doc__
    return function


@njit(**_helper)
def _take_run(a, o, c, i0, i1):
    return a[o, c, i0:i1]


@njit(**_helper)
def _take_row(a, r, c0, c1):
    return a[r, c0:c1]


@njit(**_helper)
def _take_span(a, lo, hi):
    return a[lo:hi]


_run = _absent_or(_take_run)  # a[o, c, i0:i1]
_row = _absent_or(_take_row)  # a[r, c0:c1] of rows
_span = _absent_or(_take_span)  # a[lo:hi]


@njit(fastmath=_MAP_MATH, **_helper)
def _activated(v, residual, i, floor):
    """The forward map's float64 value ``v``, plus ``residual[i]``, then ReLU'd (``floor`` 0.0):
    ``floor`` where ``v < floor``, so that NaN passes, as in PyTorch. One rounding follows, in
    the store."""
    if residual is not None:
        v = v + residual[i]
    if floor is not None:
        v = floor if v < floor else v  # noqa: FURB136 - max drops NaN
    return v


@njit(**_helper)
def _gated(g, mask, i):
    """``dy[i]`` (``g``) in float64, or 0.0 where the ReLU's output ``mask[i]`` is not > 0 (also
    where dy is NaN there, as PyTorch's threshold_backward)."""
    if mask is None:
        return np.float64(g)
    return np.float64(g) if mask[i] > 0 else 0.0


@njit(fastmath=_MAP_MATH, **_helper)
def _gradient(pc, g, qc, x, i, m, rc):
    """Backward's map at ``i``: ``p·g + q·(x − μ) + r``; without x (eval), ``p·g + r``."""
    if x is None:
        return pc * g + rc
    return pc * g + qc * (x[i] - m) + rc


@njit(**_helper)
def _put(a, i, value):
    """``a[i] = value``, unless ``a`` is None (dresidual not asked for)."""
    if a is not None:
        a[i] = value


# The streaming maps walk their runs themselves, so that the plain ones keep a loop with no
# branch in it (the branch cost 10% on 8×8 planes). Each span is sliced so that its loop counts
# from 0: Numba then drops the negative-index test that would keep LLVM from vectorizing.


@njit(fastmath=_MAP_MATH, **_helper)
def _map_runs_streamed(x, y, run, count, i0, i1, shift, scale, bias, residual, floor):
    """``_map_runs`` with streaming stores (runs of STREAM_RUN bytes or more: a division per
    run costs nothing)."""
    for k in range(run, run + count):
        o, c = divmod(k, x.shape[1])
        s, a, b = shift[c], scale[c], bias[c]
        x_run, y_run, r_run = x[o, c, i0:i1], y[o, c, i0:i1], _run(residual, o, c, i0, i1)
        head, body = _streamed(y_run)
        for i in range(head):
            y_run[i] = _activated(a * (x_run[i] - s) + b, r_run, i, floor)
        xs, ys, rs = x_run[head:body], y_run[head:body], _span(r_run, head, body)
        for i in range(ys.size):
            _store_streaming(ys, i, _activated(a * (xs[i] - s) + b, rs, i, floor))
        xs, ys, rs = x_run[body:], y_run[body:], _span(r_run, body, y_run.size)
        for i in range(ys.size):
            ys[i] = _activated(a * (xs[i] - s) + b, rs, i, floor)


@njit(fastmath=_MAP_MATH, **_helper)
def _grad_map_runs_streamed(dy, x, dx, run, count, i0, i1, mean, p, q, r, mask, dresidual):
    """``_grad_map_runs`` with streaming stores (of dx; dresidual's are plain)."""
    for k in range(run, run + count):
        o, c = divmod(k, dx.shape[1])
        m, pc, qc, rc = mean[c], p[c], q[c], r[c]
        dy_run, dx_run = dy[o, c, i0:i1], dx[o, c, i0:i1]
        x_run, y_run = _run(x, o, c, i0, i1), _run(mask, o, c, i0, i1)
        dr_run = _run(dresidual, o, c, i0, i1)
        head, body = _streamed(dx_run)
        for i in range(head):
            g = _gated(dy_run[i], y_run, i)
            dx_run[i] = _gradient(pc, g, qc, x_run, i, m, rc)
            _put(dr_run, i, g)
        dys, dxs = dy_run[head:body], dx_run[head:body]
        xs, ys, drs = _span(x_run, head, body), _span(y_run, head, body), _span(dr_run, head, body)
        for i in range(dxs.size):
            g = _gated(dys[i], ys, i)
            _store_streaming(dxs, i, _gradient(pc, g, qc, xs, i, m, rc))
            _put(drs, i, g)
        end = dx_run.size
        dys, dxs = dy_run[body:], dx_run[body:]
        xs, ys, drs = _span(x_run, body, end), _span(y_run, body, end), _span(dr_run, body, end)
        for i in range(dxs.size):
            g = _gated(dys[i], ys, i)
            dxs[i] = _gradient(pc, g, qc, xs, i, m, rc)
            _put(drs, i, g)


# The maps loop over a group of runs in one call: a call per short run (7×7 planes) costs more
# than its work, as Numba does not inline one compiled function into another.


@njit(fastmath=_MAP_MATH, **_helper)
def _map_runs(x, y, run, count, i0, i1, shift, scale, bias, residual, floor):
    """``count`` runs from run ``run`` (in memory order, ``(o, c)`` then ``(o, c + 1)``)."""
    channels = x.shape[1]
    o = run // channels
    c = run - o * channels
    for _ in range(count):
        s, a, b = shift[c], scale[c], bias[c]
        x_run, y_run, r_run = x[o, c, i0:i1], y[o, c, i0:i1], _run(residual, o, c, i0, i1)
        for i in range(x_run.size):
            y_run[i] = _activated(a * (x_run[i] - s) + b, r_run, i, floor)
        c += 1
        if c == channels:
            c = 0
            o += 1


@njit(fastmath=_MAP_MATH, **_helper)
def _grad_map_runs(dy, x, dx, run, count, i0, i1, mean, p, q, r, mask, dresidual):
    """``_map_runs`` of backward's map (x None: the eval map)."""
    channels = dx.shape[1]
    o = run // channels
    c = run - o * channels
    for _ in range(count):
        m, pc, qc, rc = mean[c], p[c], q[c], r[c]
        dy_run, dx_run = dy[o, c, i0:i1], dx[o, c, i0:i1]
        x_run, y_run = _run(x, o, c, i0, i1), _run(mask, o, c, i0, i1)
        dr_run = _run(dresidual, o, c, i0, i1)
        for i in range(dx_run.size):
            g = _gated(dy_run[i], y_run, i)
            dx_run[i] = _gradient(pc, g, qc, x_run, i, m, rc)
            _put(dr_run, i, g)
        c += 1
        if c == channels:
            c = 0
            o += 1


@njit(**_helper)
def _planar_chunk(j, outer, inner, rows, pieces):
    """Rows ``[r0, r1)`` and columns ``[i0, i1)`` of planar chunk ``j``."""
    piece = (inner + pieces - 1) // pieces
    r0 = (j // pieces) * rows
    i0 = (j % pieces) * piece
    return r0, min(r0 + rows, outer), i0, min(i0 + piece, inner)


@njit(**_helper)
def _planar_item(w, channels, pieces):
    """Work item ``w`` of a planar reduction: its channel and chunk. Items follow memory order
    (row group, channel, piece), so that each thread's share of them is one stretch of memory the
    hardware prefetcher can follow, not rows a channel's plane apart."""
    piece = w % pieces
    group, c = divmod(w // pieces, channels)
    return c, group * pieces + piece


@njit(**_helper)
def _chunk_moments(x, c, shift, r0, r1, i0, i1):
    """``(n, mean − shift, M2)`` of channel ``c``'s chunk, exactly: two passes while in cache."""
    n = (r1 - r0) * (i1 - i0)
    s = 0.0
    for r in range(r0, r1):
        s += _sum_minus(x[r, c, i0:i1], shift)
    # Second pass about the chunk's own mean, corrected (Chan, Golub & LeVeque): exact even when
    # the first pass's mean is off, and a constant chunk gives M2 = 0 exactly.
    centre = shift + s / n
    sd = 0.0
    sdd = 0.0
    for r in range(r0, r1):
        a, b = _sums_of_deviations(x[r, c, i0:i1], centre)
        sd += a
        sdd += b
    m2 = sdd - sd * sd / n
    return np.float64(n), (centre - shift) + sd / n, 0.0 if m2 < 0.0 else m2  # NaN passes


@_kernel
def _planar_moments(x, shift, rows, pieces):
    outer, channels, inner = x.shape
    chunks = (outer + rows - 1) // rows * pieces
    means = np.empty((chunks, channels))
    m2s = np.empty((chunks, channels))
    for w in prange(channels * chunks):
        c, j = _planar_item(w, channels, pieces)
        _, means[j, c], m2s[j, c] = _chunk_moments(
            x, c, shift[c], *_planar_chunk(j, outer, inner, rows, pieces))
    counts = np.empty(chunks)
    for j in range(chunks):
        r0, r1, i0, i1 = _planar_chunk(j, outer, inner, rows, pieces)
        counts[j] = (r1 - r0) * (i1 - i0)
    return _merge_pieces(counts, means, m2s)


@njit(**_helper)
def _chunk_grad_sums(dy, x, mask, c, mean, r0, r1, i0, i1):
    s = 0.0
    sx = 0.0
    for r in range(r0, r1):
        a, b = _sums_for_gradient(dy[r, c, i0:i1], x[r, c, i0:i1], mean, _run(mask, r, c, i0, i1))
        s += a
        sx += b
    return s, sx


@_kernel
def _planar_grad_sums(dy, x, mean, rows, pieces, mask):
    outer, channels, inner = x.shape
    chunks = (outer + rows - 1) // rows * pieces
    sums = np.empty((2, chunks, channels))
    for w in prange(channels * chunks):
        c, j = _planar_item(w, channels, pieces)
        sums[0, j, c], sums[1, j, c] = _chunk_grad_sums(
            dy, x, mask, c, mean[c], *_planar_chunk(j, outer, inner, rows, pieces))
    return _add_partials(sums)


@njit(**_helper)
def _map_items(rows, length, piece):
    """Work items of a map over ``rows`` rows of ``length`` values: ``rows`` cut in groups of
    ``piece // length`` rows (short rows), or each row cut in pieces of ``piece`` values (long
    ones), so that an item writes about ``piece`` values. Returns (items, rows per group, pieces
    per row)."""
    per_group = max(1, piece // length)
    pieces = (length + piece - 1) // piece
    return (rows + per_group - 1) // per_group * pieces, per_group, pieces


@njit(**_helper)
def _map_item(w, rows, length, piece, per_group, pieces):
    """Item ``w`` of ``_map_items``: its first row, how many rows, and its columns [i0, i1)."""
    group = w // pieces
    i0 = (w - group * pieces) * piece
    first = group * per_group
    return first, min(per_group, rows - first), i0, min(i0 + piece, length)


@_kernel
def _planar_affine(x, y, shift, scale, bias, piece, stream, residual, floor):
    outer, channels, inner = x.shape
    items, per_group, pieces = _map_items(outer * channels, inner, piece)
    for w in prange(items):
        run, count, i0, i1 = _map_item(w, outer * channels, inner, piece, per_group, pieces)
        if _LARGE_PATHS and stream:
            _map_runs_streamed(x, y, run, count, i0, i1, shift, scale, bias, residual, floor)
            _store_fence()
        else:
            _map_runs(x, y, run, count, i0, i1, shift, scale, bias, residual, floor)


@_kernel
def _planar_grad_map(dy, x, dx, mean, p, q, r, piece, stream, mask, dresidual):
    outer, channels, inner = dx.shape
    items, per_group, pieces = _map_items(outer * channels, inner, piece)
    for w in prange(items):
        run, count, i0, i1 = _map_item(w, outer * channels, inner, piece, per_group, pieces)
        if _LARGE_PATHS and stream:
            _grad_map_runs_streamed(dy, x, dx, run, count, i0, i1, mean, p, q, r, mask,
                                    dresidual)
            _store_fence()
        else:
            _grad_map_runs(dy, x, dx, run, count, i0, i1, mean, p, q, r, mask, dresidual)


# Planar training ops on tensors larger than the cache: one work item per channel reduces the
# channel, then maps it while its slab is still in cache (L2/L3), so the map reads from cache, not
# memory. Same chunks, same merge order, same maps as the unfused kernels above: the same bits.


@_kernel
def _planar_fused_forward(x, y, gamma, beta, eps, rows, pieces, stream, moments, floor):
    """Training forward of each channel in one work item; ``moments`` (3, C) receives the
    channel's mean, biased variance and invstd."""
    outer, channels, inner = x.shape
    chunks = (outer + rows - 1) // rows * pieces
    count = outer * inner
    shift = np.empty(channels)
    scale = np.empty(channels)
    bias = np.empty(channels)
    for c in prange(channels):
        shift[c] = x[0, c, 0]
        n, delta, m2 = 0.0, 0.0, 0.0
        for j in range(chunks):  # merged in chunk order, as _merge_pieces merges them (chan's bits)
            n, delta, m2 = _chan(n, delta, m2, *_chunk_moments(
                x, c, shift[c], *_planar_chunk(j, outer, inner, rows, pieces)))
        moments[2, c], scale[c], bias[c] = _forward_coefficients_jit(m2, count, gamma[c],
                                                                     beta[c], delta, eps)
        moments[0, c] = shift[c] + delta
        moments[1, c] = m2 / count
        one, zero = np.int64(1), np.int64(0)  # not literals, which would compile other builds
        for o in range(outer):
            if stream:
                _map_runs_streamed(x, y, o * channels + c, one, zero, inner, shift, scale, bias,
                                   None, floor)
            else:
                _map_runs(x, y, o * channels + c, one, zero, inner, shift, scale, bias, None,
                          floor)
        if stream:
            _store_fence()


@_kernel
def _planar_fused_backward(dy, x, dx, mean, invstd, gamma, rows, pieces, stream, sums):
    """Training backward of each channel in one work item; ``sums`` (2, C) receives Σdy and
    Σdy·(x − μ)."""
    outer, channels, inner = x.shape
    chunks = (outer + rows - 1) // rows * pieces
    count = outer * inner
    p = np.empty(channels)
    q = np.empty(channels)
    r = np.empty(channels)
    for c in prange(channels):
        s, sx = 0.0, 0.0
        for j in range(chunks):  # added in chunk order, as _add_partials adds them
            a, b = _chunk_grad_sums(dy, x, None, c, mean[c],
                                    *_planar_chunk(j, outer, inner, rows, pieces))
            s += a
            sx += b
        sums[0, c], sums[1, c] = s, sx
        p[c], q[c], r[c] = _backward_coefficients_jit(s, sx, count, gamma[c], invstd[c])
        one, zero = np.int64(1), np.int64(0)
        for o in range(outer):
            if stream:
                _grad_map_runs_streamed(dy, x, dx, o * channels + c, one, zero, inner, mean, p,
                                        q, r, None, None)
            else:
                _grad_map_runs(dy, x, dx, o * channels + c, one, zero, inner, mean, p, q, r, None,
                               None)
        if stream:
            _store_fence()


@njit(**_helper)
def _fuses(x3, blocks):
    """Whether a planar training op runs fused (``_planar_fused_*``): a tensor of FUSE_MIN bytes
    or more (smaller ones stay in cache between the passes anyway), channels of at most
    FUSE_SLAB bytes, and FUSE_CHANNELS channels or more to share among the threads (fewer leave
    threads idle while the last channels run). Either way gives the same bits; shape alone
    decides."""
    nbytes = x3.size * x3.itemsize
    return (x3.shape[2] >= blocks[6] and 0 < nbytes >= blocks[7]
            and nbytes <= blocks[8] * x3.shape[1] and x3.shape[1] >= FUSE_CHANNELS)


# -- rows: channels-last, N×D, and planar runs too short to vectorize --------------------------


@_kernel
def _rows_moments(x, shift, segment_rows, tile_rows, column_block):
    rows, channels = x.shape
    segments = (rows + segment_rows - 1) // segment_rows
    blocks = (channels + column_block - 1) // column_block
    means = np.empty((segments, channels))
    m2s = np.empty((segments, channels))
    for w in prange(segments * blocks):
        g = w // blocks
        c0 = (w % blocks) * column_block
        c1 = min(c0 + column_block, channels)
        width = c1 - c0
        r0 = g * segment_rows
        r1 = min(r0 + segment_rows, rows)
        s = shift[c0:c1]
        mean = means[g, c0:c1]
        m2 = m2s[g, c0:c1]
        sd = np.empty(width)
        sdd = np.empty(width)
        centre = np.empty(width)  # the tile's first row, in float64
        n = 0.0
        for t0 in range(r0, r1, tile_rows):
            t1 = min(t0 + tile_rows, r1)
            nt = np.float64(t1 - t0)
            # One pass over the tile about its own first row. The deviations are from a value of
            # the same column and tile, so the cancellation in Σd² − (Σd)²/n is bounded by the
            # tile's own spread: the error of M2 is at most ~tile_rows²·ε relative to the tile's
            # M2, whatever the data (Samuelson's inequality bounds any value's distance from the
            # mean). For float32 x, d and d² are exact in float64.
            first = x[t0, c0:c1]
            for k in range(width):  # not sd[:] = 0: that is one more parallel loop to compile
                centre[k] = first[k]
                sd[k] = 0.0
                sdd[k] = 0.0
            # Four rows per sweep: the accumulators are loaded and stored once per four rows
            # (the load ports bind this loop), and each column still adds its rows in order.
            swept = t0 + 1
            while swept + 4 <= t1:
                x0, x1, x2, x3 = (x[swept, c0:c1], x[swept + 1, c0:c1], x[swept + 2, c0:c1],
                                  x[swept + 3, c0:c1])
                for k in range(width):
                    ck = centre[k]
                    d0, d1, d2, d3 = x0[k] - ck, x1[k] - ck, x2[k] - ck, x3[k] - ck
                    sd[k] = (((sd[k] + d0) + d1) + d2) + d3
                    sdd[k] = (((sdd[k] + d0 * d0) + d1 * d1) + d2 * d2) + d3 * d3
                swept += 4
            for r in range(swept, t1):
                xr = x[r, c0:c1]
                for k in range(width):
                    d = xr[k] - centre[k]
                    sd[k] += d
                    sdd[k] += d * d
            for k in range(width):  # the tile's mean (about the shift) and M2, in sd and sdd
                tile_m2 = sdd[k] - sd[k] * sd[k] / nt
                if tile_m2 < 0.0:  # rounding only; NaN passes
                    tile_m2 = 0.0
                sdd[k] = tile_m2
                sd[k] = (centre[k] - s[k]) + sd[k] / nt
            n = _chan_into(n, mean, m2, nt, sd, sdd)  # merged into the segment's moments
    counts = np.empty(segments)
    for g in range(segments):
        counts[g] = min(segment_rows, rows - g * segment_rows)
    return _merge_pieces(counts, means, m2s)


@_kernel
def _rows_grad_sums(dy, x, mean, segment_rows, column_block, mask):
    rows, channels = x.shape
    segments = (rows + segment_rows - 1) // segment_rows
    blocks = (channels + column_block - 1) // column_block
    sums = np.empty((2, segments, channels))
    for w in prange(segments * blocks):
        g = w // blocks
        c0 = (w % blocks) * column_block
        c1 = min(c0 + column_block, channels)
        s = sums[0, g, c0:c1]
        sx = sums[1, g, c0:c1]
        for k in range(c1 - c0):  # not np.zeros: in a parallel function that is one more
            s[k] = 0.0            # parallel loop to compile
            sx[k] = 0.0
        m = mean[c0:c1]
        r0, r1 = g * segment_rows, min((g + 1) * segment_rows, rows)
        while r0 + 4 <= r1:  # four rows per sweep, each column's rows added in order
            g0, g1, g2, g3 = dy[r0, c0:c1], dy[r0 + 1, c0:c1], dy[r0 + 2, c0:c1], dy[r0 + 3, c0:c1]
            x0, x1, x2, x3 = x[r0, c0:c1], x[r0 + 1, c0:c1], x[r0 + 2, c0:c1], x[r0 + 3, c0:c1]
            y0, y1 = _row(mask, r0, c0, c1), _row(mask, r0 + 1, c0, c1)
            y2, y3 = _row(mask, r0 + 2, c0, c1), _row(mask, r0 + 3, c0, c1)
            for k in range(c1 - c0):
                mk = m[k]
                v0, v1 = _gated(g0[k], y0, k), _gated(g1[k], y1, k)
                v2, v3 = _gated(g2[k], y2, k), _gated(g3[k], y3, k)
                s[k] = (((s[k] + v0) + v1) + v2) + v3
                sx[k] = (((sx[k] + v0 * (x0[k] - mk)) + v1 * (x1[k] - mk)) + v2 * (x2[k] - mk)
                         + v3 * (x3[k] - mk))
            r0 += 4
        for r in range(r0, r1):
            gr = dy[r, c0:c1]
            xr = x[r, c0:c1]
            yr = _row(mask, r, c0, c1)
            for k in range(c1 - c0):
                v = _gated(gr[k], yr, k)
                s[k] += v
                sx[k] += v * (xr[k] - m[k])
    return _add_partials(sums)


@_kernel(fastmath=_MAP_MATH)
def _rows_affine(x, y, shift, scale, bias, piece, stream, residual, floor):
    rows, width = x.shape
    items, per_group, pieces = _map_items(rows, width, piece)
    for w in prange(items):
        first, count, c0, c1 = _map_item(w, rows, width, piece, per_group, pieces)
        s, a, b = shift[c0:c1], scale[c0:c1], bias[c0:c1]
        if _LARGE_PATHS and stream:  # whole rows (pieces start at multiples of CHUNK): aligned
            for r in range(first, first + count):
                xr, yr, rr = x[r, c0:c1], y[r, c0:c1], _row(residual, r, c0, c1)
                for c in range(c1 - c0):
                    _store_streaming16(yr, c, _activated(a[c] * (xr[c] - s[c]) + b[c], rr, c,
                                                         floor))
            _store_fence()
            continue
        swept = first
        # float32 rows wider than 64 values: loading the float64 coefficients binds the loop, so
        # four rows share each load (measured slower for float64 and for narrower rows here).
        if x.itemsize == 4 and c1 - c0 > 64:
            while swept + 4 <= first + count:
                r = swept
                x0, x1, x2, x3 = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
                y0, y1, y2, y3 = y[r, c0:c1], y[r + 1, c0:c1], y[r + 2, c0:c1], y[r + 3, c0:c1]
                e0, e1 = _row(residual, r, c0, c1), _row(residual, r + 1, c0, c1)
                e2, e3 = _row(residual, r + 2, c0, c1), _row(residual, r + 3, c0, c1)
                for c in range(c1 - c0):
                    sc, ac, bc = s[c], a[c], b[c]
                    y0[c] = _activated(ac * (x0[c] - sc) + bc, e0, c, floor)
                    y1[c] = _activated(ac * (x1[c] - sc) + bc, e1, c, floor)
                    y2[c] = _activated(ac * (x2[c] - sc) + bc, e2, c, floor)
                    y3[c] = _activated(ac * (x3[c] - sc) + bc, e3, c, floor)
                swept += 4
        for r in range(swept, first + count):
            xr, yr, rr = x[r, c0:c1], y[r, c0:c1], _row(residual, r, c0, c1)
            for c in range(c1 - c0):
                yr[c] = _activated(a[c] * (xr[c] - s[c]) + b[c], rr, c, floor)


@_kernel(fastmath=_MAP_MATH)
def _rows_grad_map(dy, x, dx, mean, p, q, r, piece, stream, mask, dresidual):
    rows, width = dx.shape
    items, per_group, pieces = _map_items(rows, width, piece)
    for w in prange(items):
        first, count, c0, c1 = _map_item(w, rows, width, piece, per_group, pieces)
        m, pc, qc, rc = mean[c0:c1], p[c0:c1], q[c0:c1], r[c0:c1]
        for o in range(first, first + count):
            gr, dxr, xr = dy[o, c0:c1], dx[o, c0:c1], _row(x, o, c0, c1)
            yr, drr = _row(mask, o, c0, c1), _row(dresidual, o, c0, c1)
            if _LARGE_PATHS and stream:
                for c in range(c1 - c0):
                    g = _gated(gr[c], yr, c)
                    _store_streaming16(dxr, c, _gradient(pc[c], g, qc[c], xr, c, m[c], rc[c]))
                    _put(drr, c, g)
            else:
                for c in range(c1 - c0):
                    g = _gated(gr[c], yr, c)
                    dxr[c] = _gradient(pc[c], g, qc[c], xr, c, m[c], rc[c])
                    _put(drr, c, g)
        if _LARGE_PATHS and stream:
            _store_fence()


# -- cutting the view into work -----------------------------------------------------------------


@njit(**_helper)
def _planar_plan(outer, inner, chunk):
    """(rows, pieces): a chunk is ``rows`` whole rows, or one of ``pieces`` parts of a row."""
    if inner >= chunk:
        return 1, (inner + chunk - 1) // chunk
    return max(1, chunk // inner), 1


@njit(**_helper)
def _rows_plan(rows, width, blocks):
    """(segment_rows, tile_rows, column_block) for ``rows`` rows of ``width`` values.

    A work item is a segment of rows (whole tiles, at most SEGMENT values) times a block of
    columns; segments are made short enough for MIN_WORK_ITEMS items, so that a small tensor still
    gives every core work. Shape alone, never the thread count, decides the plan.
    """
    tile_rows, segment, column_block, min_items = blocks[1:5]
    block = min(width, column_block)
    segments = (min_items + (width + block - 1) // block - 1) // ((width + block - 1) // block)
    tiles = max(1, min(segment // block // tile_rows,
                       (rows + segments * tile_rows - 1) // (segments * tile_rows)))
    return tiles * tile_rows, tile_rows, block


@njit(**_helper)
def _fold(a3, blocks):
    """How many rows of ``a3`` the rows kernels read as one (see ``_rows_of``)."""
    outer, channels, inner = a3.shape
    return min(outer, max(1, blocks[5] // (channels * inner)))


@njit(**_helper)
def _rows_of(a3, fold, leftover):
    """``a3`` ``(outer, C, inner)`` read as rows of ``C·inner`` values, ``fold`` rows at a time.

    The rows kernels loop along a row, so with short rows (C = 3 channels-last, say) they would not
    fill the SIMD lanes: ``fold`` consecutive rows are read as one, which gives ``fold`` columns per
    channel and position. Rows left over (fewer than ``fold``) are read one at a time, as a second
    part (``leftover``).
    """
    outer, channels, inner = a3.shape
    width = channels * inner
    whole = outer - outer % fold
    flat = a3.reshape(outer * width)
    if leftover:
        return flat[whole * width:].reshape(outer - whole, width)
    return flat[:whole * width].reshape(whole // fold, fold * width)


_rows_or_none = _absent_or(_rows_of)  # _rows_of of an array that may be absent


@njit(**_helper)
def _parts(a3, fold):
    """The parts ``_rows_of`` reads ``a3`` in: 1, or 2 when rows are left over."""
    return 1 if a3.shape[0] % fold == 0 else 2


@njit(**_helper)
def _per_column(values, inner, fold):
    """Per-channel float64 values laid out along a row of ``_rows_of``."""
    if inner == 1 and fold == 1:
        return values
    laid_out = np.empty((fold, values.size, inner))
    for k in range(fold):
        for c in range(values.size):
            for i in range(inner):
                laid_out[k, c, i] = values[c]
    return laid_out.reshape(fold * values.size * inner)


# -- the steps: one compiled call each (the device interface below calls them) -----------------


@_step
def _moments_about(x3, shift, blocks):
    """Per-channel mean of ``x − shift`` and sum of squared deviations ``M2``, both float64."""
    outer, channels, inner = x3.shape
    if inner >= blocks[6]:
        return _planar_moments(x3, shift, *_planar_plan(outer, inner, blocks[0]))
    fold = _fold(x3, blocks)
    if fold == 1 and inner == 1:  # N×D, or channels-last with C ≥ FOLD_WIDTH
        rows = x3.reshape(outer, channels)
        return _rows_moments(rows, shift, *_rows_plan(outer, channels, blocks))
    # Each column of a part is one piece of its channel: merge the pieces in a fixed order.
    parts = _parts(x3, fold)
    pieces = (fold + parts - 1) * inner
    counts = np.empty(pieces)
    means = np.empty((pieces, channels))
    m2s = np.empty((pieces, channels))
    j = 0
    for part in range(parts):
        rows = _rows_of(x3, fold, part == 1)
        columns = fold if part == 0 else 1
        mean, m2 = _rows_moments(rows, _per_column(shift, inner, columns),
                                 *_rows_plan(rows.shape[0], rows.shape[1], blocks))
        for k in range(columns):
            for i in range(inner):
                for c in range(channels):
                    column = (k * channels + c) * inner + i
                    means[j, c] = mean[column]
                    m2s[j, c] = m2[column]
                counts[j] = rows.shape[0]
                j += 1
    return _merge_pieces(counts, means, m2s)


@_step
def _moments(x3, blocks):
    """``moments``: per-channel ``(shift, delta, M2)``."""
    channels = x3.shape[1]
    if x3.size == 0:
        return np.zeros(channels), np.zeros(channels), np.zeros(channels)
    shift = np.empty(channels)
    for c in range(channels):
        shift[c] = x3[0, c, 0]
    delta, m2 = _moments_about(x3, shift, blocks)
    return shift, delta, m2


@_step
def _affine(x3, y3, shift, scale, bias, blocks, residual3, floor):
    """``y = scale·(x − shift) + bias`` per channel (float64 vectors), written into ``y3``; plus
    ``residual3`` and ReLU'd (``floor`` 0.0) where given (not None)."""
    if x3.size == 0:
        return
    inner = x3.shape[2]
    if inner >= blocks[6]:
        _planar_affine(x3, y3, shift, scale, bias, blocks[0], _streams(y3, blocks), residual3,
                       floor)
        return
    fold = _fold(x3, blocks)
    for part in range(_parts(x3, fold)):
        columns = fold if part == 0 else 1
        leftover = part == 1
        y = _rows_of(y3, fold, leftover)
        _rows_affine(_rows_of(x3, fold, leftover), y, _per_column(shift, inner, columns),
                     _per_column(scale, inner, columns), _per_column(bias, inner, columns),
                     blocks[0], _streams_rows(y, blocks), _rows_or_none(residual3, fold, leftover),
                     floor)


@_step
def _forward_map(x3, y3, shift, delta, m2, gamma, beta, eps, blocks, residual3, floor):
    """``forward_map``."""
    count = x3.shape[0] * x3.shape[2]
    channels = x3.shape[1]
    invstd = np.empty(channels)
    scale = np.empty(channels)
    bias = np.empty(channels)
    for c in range(channels):
        invstd[c], scale[c], bias[c] = _forward_coefficients_jit(m2[c], count, gamma[c], beta[c],
                                                                 delta[c], eps)
    _affine(x3, y3, shift, scale, bias, blocks, residual3, floor)
    return shift + delta, m2 / count, invstd


@_step
def _normalize_with(x3, y3, mean, var, gamma, beta, eps, blocks, residual3, floor):
    """``normalize_with``, with float64 ``mean`` and ``var``."""
    channels = mean.size
    invstd = np.empty(channels)
    scale = np.empty(channels)
    bias = np.empty(channels)
    for c in range(channels):  # a loop, not array expressions: no temporaries
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
        scale[c] = gamma[c] * invstd[c]
        bias[c] = beta[c]
    _affine(x3, y3, mean, scale, bias, blocks, residual3, floor)
    return invstd


@_step
def _gradient_sums(dy3, x3, mean, blocks, mask3):
    """``gradient_sums``."""
    outer, channels, inner = x3.shape
    if x3.size == 0:
        return np.zeros(channels), np.zeros(channels)
    if inner >= blocks[6]:
        sums = _planar_grad_sums(dy3, x3, mean, *_planar_plan(outer, inner, blocks[0]), mask3)
        return sums[0], sums[1]
    sums = np.zeros((2, channels))
    fold = _fold(x3, blocks)
    for part in range(_parts(x3, fold)):
        columns = fold if part == 0 else 1
        leftover = part == 1
        x = _rows_of(x3, fold, leftover)
        segment_rows, _, block = _rows_plan(x.shape[0], x.shape[1], blocks)
        per_column = _rows_grad_sums(_rows_of(dy3, fold, leftover), x,
                                     _per_column(mean, inner, columns), segment_rows, block,
                                     _rows_or_none(mask3, fold, leftover))
        for k in range(columns):
            for c in range(channels):
                for i in range(inner):
                    column = (k * channels + c) * inner + i
                    sums[0, c] += per_column[0, column]
                    sums[1, c] += per_column[1, column]
    return sums[0], sums[1]


@_step
def _grad_map(dy3, x3, dx3, mean, p, q, r, blocks, mask3, dresidual3):
    """``dx = p·g + q·(x − mean) + r`` per channel, written into ``dx3``, where ``g`` is dy, or
    dy masked by the ReLU's output ``mask3``; ``g`` written into ``dresidual3`` if given. With
    ``x3`` None (eval), ``dx = p·g + r``."""
    inner = dx3.shape[2]
    if inner >= blocks[6]:
        _planar_grad_map(dy3, x3, dx3, mean, p, q, r, blocks[0], _streams(dx3, blocks), mask3,
                         dresidual3)
        return
    fold = _fold(dx3, blocks)
    for part in range(_parts(dx3, fold)):
        columns = fold if part == 0 else 1
        leftover = part == 1
        dx = _rows_of(dx3, fold, leftover)
        _rows_grad_map(_rows_of(dy3, fold, leftover), _rows_or_none(x3, fold, leftover), dx,
                       _per_column(mean, inner, columns), _per_column(p, inner, columns),
                       _per_column(q, inner, columns), _per_column(r, inner, columns), blocks[0],
                       _streams_rows(dx, blocks), _rows_or_none(mask3, fold, leftover),
                       _rows_or_none(dresidual3, fold, leftover))


@_step
def _backward_map(dy3, x3, dx3, mean, invstd, gamma, sum_dy, sum_dy_xmu, count, training,
                  blocks, mask3, dresidual3):
    """``backward_map``."""
    if x3.size == 0:
        return
    channels = x3.shape[1]
    p = np.empty(channels)
    q = np.empty(channels)
    r = np.empty(channels)
    for c in range(channels):
        p[c], q[c], r[c] = _backward_coefficients_jit(sum_dy[c], sum_dy_xmu[c], count, gamma[c],
                                                      invstd[c])
    if training:
        _grad_map(dy3, x3, dx3, mean, p, q, r, blocks, mask3, dresidual3)
    elif mask3 is None and dresidual3 is None:
        zeros = np.zeros(channels)
        _affine(dy3, dx3, zeros, p, zeros, blocks, None, None)
    else:  # p·g + 0, as the plain eval map p·(dy − 0) + 0 gives
        zeros = np.zeros(channels)
        _grad_map(dy3, None, dx3, zeros, p, zeros, zeros, blocks, mask3, dresidual3)


@njit(**_jit)
def _update_running(running_mean, running_var, mean, var, momentum, unbias):
    """``update_running``, in float64, rounded once to the running arrays' dtype."""
    for c in range(mean.size):
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c]
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * var[c] * unbias


# -- the normalization family: statistics per row of a (rows, P, S) view ----------------------
#
# Layer, group, instance and RMS norm (fastbn._norms, docs/design.md §2.7) take statistics over
# each row of ``x2`` (the GroupView ``(rows, P, S)`` as rows of ``L = P·S`` contiguous values) and
# scale element ``(r, p, s)`` by parameter ``(r % groups)·P + p``. A row is one work item, reduced
# and mapped by one thread while it sits in its cache (rows of up to a few hundred KB): one read
# and one write of memory, as a copy. Each row's arithmetic is the same whichever thread runs it,
# and the parameter gradients add fixed blocks of rows in order, so results do not depend on the
# thread count.

NORM_BLOCKS = 64  # the parameter gradients are summed in at most this many blocks of rows


@njit(fastmath=_SUM_MATH, **_helper)
def _sum_of_squares(run):
    s = 0.0
    for i in range(run.size):
        v = np.float64(run[i])
        s += v * v
    return s


@njit(fastmath=_SUM_MATH, **_helper)
def _weighted_gradient_sums(dy_run, x_run, mean, weight):
    s = 0.0
    sx = 0.0
    for i in range(dy_run.size):
        g = np.float64(weight[i]) * dy_run[i]  # in float64 whatever the dtypes
        s += g
        sx += g * (x_run[i] - mean)
    return s, sx


@njit(**_helper)
def _row_moments(row, chunk):
    """``(mean − s, M2)`` of a row about its first value ``s``, chunk by chunk (``chunk``
    values, in cache), the chunks merged in order with ``chan``.

    A chunk is reduced in one pass about ``s``, a value of the same row, and the result is kept
    when ``Σd² ≤ 16·M2``: the shift then lies within four standard deviations of the chunk's
    mean, so the cancellation in ``M2 = Σd² − (Σd)²/n`` costs at most four bits of float64
    (far below float32's precision). Otherwise (an outlying first value, NaN) the chunk is
    reduced again about its own mean, exactly, as ``_chunk_moments``. A constant row gives
    ``M2 = 0`` and ``mean = s`` exactly.
    """
    shift = np.float64(row[0])
    n = 0.0
    delta = 0.0
    m2 = 0.0
    for i0 in range(0, row.size, chunk):
        run = row[i0:i0 + chunk]
        k = np.float64(run.size)
        sd, sdd = _sums_of_deviations(run, shift)
        piece = sdd - sd * sd / k
        mean_d = sd / k
        if not sdd <= 16.0 * piece:
            centre = shift + mean_d
            sd, sdd = _sums_of_deviations(run, centre)
            piece = sdd - sd * sd / k
            mean_d = (centre - shift) + sd / k
        n, delta, m2 = _chan(n, delta, m2, k, mean_d, 0.0 if piece < 0.0 else piece)  # NaN passes
    return delta, m2


@njit(fastmath=_MAP_MATH, **_helper)
def _row_map(x, y, base, runs, run, shift, delta, invstd, gamma, beta, stream):
    """``y = a·(x − shift) + (β − a·delta)``, ``a = γ·invstd``, along one row of ``runs`` runs
    of ``run`` values (each run scaled by one parameter, from ``base`` on): a constant row
    (x = shift, delta = 0) gives exactly β. ``stream``: runs (not rows: a layer norm of 32 MB
    ran 15% slower so) are written with streaming stores; the caller fences.

    Loops index slices from 0: an index Numba cannot prove non-negative (``base + k``) gets a
    wraparound test that keeps the loop from vectorizing (5x slower here).
    """
    if run == 1:  # a parameter per value (layer and RMS norm): vectorized along the row
        g = gamma[base:base + runs]
        b = beta[base:base + runs]
        for k in range(x.size):
            a = g[k] * invstd
            y[k] = a * (x[k] - shift) + (b[k] - a * delta)
        return
    for p in range(runs):
        a = gamma[base + p] * invstd
        b = beta[base + p] - a * delta
        xp = x[p * run:(p + 1) * run]
        yp = y[p * run:(p + 1) * run]
        head = body = 0
        if stream:
            head, body = _streamed(yp)
            for i in range(head):
                yp[i] = a * (xp[i] - shift) + b
            xs, ys = xp[head:body], yp[head:body]
            for i in range(ys.size):
                _store_streaming(ys, i, a * (xs[i] - shift) + b)
        xs, ys = xp[body:], yp[body:]
        for i in range(ys.size):
            ys[i] = a * (xs[i] - shift) + b


# The backward of layer and RMS norm's rows (a parameter per value, one group) takes this
# instead of _row_gradient: the same arithmetic, indexed as ``a2[r, k]``, the map and the
# parameter sums in two loops. _row_gradient's slices and branches cost about 100 ns a row, more
# than the work of a 64-value row: a layer norm's backward of 512×64 float32 took 97 µs, now 33
# (forward, the same change gained nothing measurable).


@njit(fastmath=_MAP_MATH, **_helper)
def _indexed_row_gradient(dy2, x2, dx2, r, mean, p, q, r0, gamma, partials, block):
    for k in range(x2.shape[1]):
        dx2[r, k] = gamma[k] * p * np.float64(dy2[r, k]) + (q * (x2[r, k] - mean) + r0)
    for k in range(x2.shape[1]):
        g = np.float64(dy2[r, k])
        partials[0, block, k] += g * (x2[r, k] - mean) * p
        partials[1, block, k] += g


@njit(**_helper)
def _first_parameter(r, groups, runs):
    """The parameter of row r's first run (no division where every row has the same)."""
    return 0 if groups == 1 else (r % groups) * runs


@njit(**_helper)
def _streams_runs(y2, runs, blocks):
    """Whether the family's maps write ``y2`` with streaming stores (as ``_streams``): each
    stretch they write is a run, or a whole row where there is a parameter per value (the
    backward only, where it ran 8-10% faster on 8192×1024)."""
    run = y2.shape[1] // runs
    stretch = y2.shape[1] if run == 1 else run
    return y2.size * y2.itemsize >= blocks[9] and stretch * y2.itemsize >= blocks[10]


@_kernel
def _rows_normalize(x2, y2, runs, groups, gamma, beta, eps, centred, stats, chunk, stream):
    length = x2.shape[1]
    run = length // runs
    for r in prange(x2.shape[0]):
        row = x2[r]
        if centred:
            shift = np.float64(row[0])
            delta, m2 = _row_moments(row, chunk)
            var = m2 / length
        else:  # RMS norm: the mean square, about 0
            shift = delta = 0.0
            var = _sum_of_squares(row) / length
        invstd = 1.0 / np.sqrt(var + eps)
        _row_map(row, y2[r], _first_parameter(r, groups, runs), runs, run, shift, delta, invstd,
                 gamma, beta, stream)
        if stream:
            _store_fence()
        stats[0, r] = shift + delta
        stats[1, r] = var
        stats[2, r] = invstd


@_kernel
def _rows_normalize_with(x2, y2, runs, groups, mean, invstd, gamma, beta, stream):
    run = x2.shape[1] // runs
    for r in prange(x2.shape[0]):
        _row_map(x2[r], y2[r], _first_parameter(r, groups, runs), runs, run, mean[r], 0.0,
                 invstd[r], gamma, beta, stream)
        if stream:
            _store_fence()


@njit(fastmath=_MAP_MATH, **_helper)
def _row_gradient(dy, x, dx, base, runs, run, mean, p, q, r, gamma, dgamma, dbeta, stream):
    """``dx = γ·p·dy + q·(x − mean) + r`` along one row (as ``_row_map``'s, slices indexed from
    0, ``stream`` as there), and, for a parameter per value, its ``Σdy·(x − mean)·p`` and
    ``Σdy`` added into ``dgamma``, ``dbeta``."""
    if run == 1:
        gs = gamma[base:base + runs]
        dgs = dgamma[base:base + runs]
        dbs = dbeta[base:base + runs]
        head = body = 0
        if stream:
            head, body = _streamed(dx)
            for k in range(head):
                g = np.float64(dy[k])
                xmu = x[k] - mean
                dx[k] = gs[k] * p * g + (q * xmu + r)
                dgs[k] += g * xmu * p
                dbs[k] += g
            dys, xs, dxs = dy[head:body], x[head:body], dx[head:body]
            g_s, dg_s, db_s = gs[head:body], dgs[head:body], dbs[head:body]
            for k in range(dxs.size):
                g = np.float64(dys[k])
                xmu = xs[k] - mean
                _store_streaming(dxs, k, g_s[k] * p * g + (q * xmu + r))
                dg_s[k] += g * xmu * p
                db_s[k] += g
        dys, xs, dxs = dy[body:], x[body:], dx[body:]
        g_s, dg_s, db_s = gs[body:], dgs[body:], dbs[body:]
        for k in range(dxs.size):
            g = np.float64(dys[k])
            xmu = xs[k] - mean
            dxs[k] = g_s[k] * p * g + (q * xmu + r)
            dg_s[k] += g * xmu * p
            db_s[k] += g
        return
    for c in range(runs):
        pc = gamma[base + c] * p
        dyc = dy[c * run:(c + 1) * run]
        xc = x[c * run:(c + 1) * run]
        dxc = dx[c * run:(c + 1) * run]
        head = body = 0
        if stream:
            head, body = _streamed(dxc)
            for i in range(head):
                dxc[i] = pc * dyc[i] + (q * (xc[i] - mean) + r)
            dys, xs, dxs = dyc[head:body], xc[head:body], dxc[head:body]
            for i in range(dxs.size):
                _store_streaming(dxs, i, pc * dys[i] + (q * (xs[i] - mean) + r))
        dys, xs, dxs = dyc[body:], xc[body:], dxc[body:]
        for i in range(dxs.size):
            dxs[i] = pc * dys[i] + (q * (xs[i] - mean) + r)


@_kernel
def _rows_normalize_backward(dy2, x2, dx2, runs, groups, mean, invstd, gamma, training,
                             rows_per_block, partials, stream):
    rows, length = x2.shape
    run = length // runs
    indexed = run == 1 and groups == 1 and not stream
    for block in prange(partials.shape[1]):
        dgamma = partials[0, block]
        dbeta = partials[1, block]
        for c in range(dgamma.size):
            dgamma[c] = dbeta[c] = 0.0
        for r in range(block * rows_per_block, min((block + 1) * rows_per_block, rows)):
            base = _first_parameter(r, groups, runs)
            centre = 0.0 if mean is None else mean[r]
            p = invstd[r]
            q = r0 = 0.0
            if indexed:
                if training:
                    a, b = _weighted_gradient_sums(dy2[r], x2[r], centre, gamma)
                    q = -p * p * p * b / length
                    r0 = 0.0 if mean is None else -p * a / length
                _indexed_row_gradient(dy2, x2, dx2, r, centre, p, q, r0, gamma, partials, block)
                continue
            if training or run > 1:
                if run == 1:
                    a, b = _weighted_gradient_sums(dy2[r], x2[r], centre,
                                                   gamma[base:base + runs])
                else:  # a parameter per run: plain sums per run, weighted after
                    a = b = 0.0
                    for c in range(runs):
                        u, v = _sums_for_gradient(dy2[r, c * run:(c + 1) * run],
                                                  x2[r, c * run:(c + 1) * run], centre, None)
                        a += gamma[base + c] * u
                        b += gamma[base + c] * v
                        dgamma[base + c] += v * p
                        dbeta[base + c] += u
                if training:
                    q = -p * p * p * b / length
                    r0 = 0.0 if mean is None else -p * a / length
            _row_gradient(dy2[r], x2[r], dx2[r], base, runs, run, centre, p, q, r0, gamma,
                          dgamma, dbeta, stream)
        if stream:
            _store_fence()


@_step(cost=FAMILY_COST)
def _group_forward(x2, y2, runs, groups, gamma, beta, eps, centred, stats, blocks):
    _rows_normalize(x2, y2, runs, groups, gamma, beta, eps, centred, stats, blocks[0],
                    _LARGE_PATHS and runs < x2.shape[1] and _streams_runs(y2, runs, blocks))


@_step(cost=FAMILY_COST)
def _group_normalize_with(x2, y2, runs, groups, mean, invstd, gamma, beta, blocks):
    _rows_normalize_with(x2, y2, runs, groups, mean, invstd, gamma, beta,
                         _LARGE_PATHS and runs < x2.shape[1] and _streams_runs(y2, runs, blocks))


@_step(cost=FAMILY_COST)
def _group_backward(dy2, x2, dx2, runs, groups, mean, invstd, gamma, training, grads, blocks):
    rows = x2.shape[0]
    per_block = max(1, (rows + blocks[11] - 1) // blocks[11])  # from the shape alone: fixed sums
    partials = np.empty((2, (rows + per_block - 1) // per_block, grads.shape[1]))
    _rows_normalize_backward(dy2, x2, dx2, runs, groups, mean, invstd, gamma, training,
                             per_block, partials,
                             _LARGE_PATHS and _streams_runs(dx2, runs, blocks))
    total = _add_partials(partials)
    _store_rows(grads, total[0], total[1])


# -- whole ops in one compiled call: the lean path of fastbn.forward and fastbn.backward --------
#
# Results go into arrays the caller made (stats, grads): a compiled function's returned arrays
# cost more to hand to Python than a small tensor's whole work.


@njit(**_helper)
def _store_rows(into, first, second):
    """``into[0], into[1] = first, second``, in into's dtype. (A loop: slice assignment would
    compile NumPy's shape-mismatch error message, seconds on a cold start.)"""
    for c in range(first.size):
        into[0, c] = first[c]
        into[1, c] = second[c]


@_step
def _train_forward(x3, y3, gamma, beta, eps, running_mean, running_var, momentum, stats,
                   blocks, residual3, floor):
    # A residual, or backward's mask and dresidual, would not stay in cache with the channel
    # (64×64×56×56 float32 with them ran 8-14% faster unfused): those ops run unfused.
    if _LARGE_PATHS and residual3 is None and _fuses(x3, blocks):
        moments = np.empty((3, x3.shape[1]))
        _planar_fused_forward(x3, y3, gamma, beta, eps,
                              *_planar_plan(x3.shape[0], x3.shape[2], blocks[0]),
                              _streams(y3, blocks), moments, floor)
        mean, var, invstd = moments[0], moments[1], moments[2]
    else:
        shift, delta, m2 = _moments(x3, blocks)
        mean, var, invstd = _forward_map(x3, y3, shift, delta, m2, gamma, beta, eps, blocks,
                                         residual3, floor)
    if running_mean is not None:
        count = x3.shape[0] * x3.shape[2]
        _update_running(running_mean, running_var, mean, var, momentum, count / (count - 1))
    _store_rows(stats, mean, invstd)


@_step
def _eval_forward(x3, y3, gamma, beta, eps, running_mean, running_var, stats, blocks, residual3,
                  floor):
    mean = running_mean.astype(np.float64)  # a copy: stats must not alias running_mean
    invstd = _normalize_with(x3, y3, mean, running_var.astype(np.float64), gamma, beta, eps,
                             blocks, residual3, floor)
    _store_rows(stats, mean, invstd)


@_step
def _backward(dy3, x3, dx3, mean, invstd, gamma, training, grads, blocks, mask3, dresidual3):
    if _LARGE_PATHS and training and mask3 is None and dresidual3 is None \
            and _fuses(x3, blocks):
        sums = np.empty((2, x3.shape[1]))
        _planar_fused_backward(dy3, x3, dx3, mean, invstd, gamma,
                               *_planar_plan(x3.shape[0], x3.shape[2], blocks[0]),
                               _streams(dx3, blocks), sums)
        sum_dy, sum_dy_xmu = sums[0], sums[1]
    else:
        sum_dy, sum_dy_xmu = _gradient_sums(dy3, x3, mean, blocks, mask3)
        _backward_map(dy3, x3, dx3, mean, invstd, gamma, sum_dy, sum_dy_xmu,
                      x3.shape[0] * x3.shape[2], training, blocks, mask3, dresidual3)
    _store_rows(grads, sum_dy_xmu * invstd, sum_dy)


@functools.lru_cache(maxsize=64)
def _constant(value, channels):
    """A float64 (C,) array of ``value``, made once per size: never written, never handed out."""
    return np.full(channels, value)


def batch_norm(x3, y3, gamma, beta, eps, training, running_mean, running_var, momentum,
               residual3=None, relu=False):
    """A whole forward in one compiled call, for C-contiguous arrays that need no conversion.

    ``gamma``, ``beta``: float32/float64 (C,) arrays or None; the running statistics float32/
    float64 (C,) arrays, or None in training; ``residual3`` added and ``relu`` applied after the
    map (``forward_map``). Returns the float64 ``(mean, invstd)`` as the two rows of one array.
    """
    channels = x3.shape[1]
    gamma = _constant(1.0, channels) if gamma is None else gamma
    beta = _constant(0.0, channels) if beta is None else beta
    stats = np.empty((2, channels))
    if training:
        _train_forward.build(x3.size)(x3, y3, gamma, beta, eps, running_mean, running_var,
                                      momentum, stats, _blocks(), residual3, _floor(relu))
    else:
        _eval_forward.build(x3.size)(x3, y3, gamma, beta, eps, running_mean, running_var, stats,
                                     _blocks(), residual3, _floor(relu))
    return stats


def batch_norm_backward(dy3, x3, dx3, mean, invstd, gamma, training, y3=None,
                        dresidual3=None):
    """A whole backward in one compiled call (arrays as ``batch_norm``'s; ``y3`` and
    ``dresidual3`` as ``backward_map``'s): ``(dgamma, dbeta)``, in gamma's dtype (x's if gamma
    is None), as the two rows of one array."""
    channels = x3.shape[1]
    grads = np.empty((2, channels), x3.dtype if gamma is None else gamma.dtype)
    gamma = _constant(1.0, channels) if gamma is None else gamma
    _backward.build(x3.size)(dy3, x3, dx3, mean, invstd, gamma, training, grads, _blocks(), y3,
                             dresidual3)
    return grads


def _floor(relu):
    """What the maps take for the activation: ReLU's 0.0, or None."""
    return 0.0 if relu else None


# -- the device interface: the same names, arguments and results in fastbn/cuda.py -------------


NAME = "cpu"


def view(x, axis):
    """The ``(outer, C, inner)`` view of arrays laid out like ``x``, in x's memory order."""
    return ChannelView(x, axis)


def operands(view, *arrays):
    """The arrays as the kernels read them: ``(outer, C, inner)``, views where possible."""
    return [view.of(a) for a in arrays]


class _Output:
    """Where an op writes its result of x's shape (``array3``), and how it is handed back."""

    def __init__(self, view, out, like):
        self._result, self.array3, self._pending = view.output(out, like.dtype)

    def finish(self, *per_channel):
        """``(result, *per_channel)``: ``out`` filled from the buffer if it was not laid out
        like x."""
        if self._pending is not None:
            self._result[...] = self._pending
        return (self._result, *per_channel)


def output(view, out, like):
    """Where a result of ``like``'s shape goes: ``out`` (possibly ``like`` itself) or a new array
    in x's memory order."""
    return _Output(view, out, like)


def per_channel(values, channels, fill=None, copy=False):
    """``(C,)`` values as a float64 array here; ``None`` gives ``fill`` everywhere (or None), an
    array made once per size and only ever read (gamma and beta left out).

    A float64 array is returned as it is unless ``copy``; a GPU one is copied to the host.
    """
    if isinstance(values, np.ndarray):
        return np.array(values, np.float64) if copy else np.asarray(values, np.float64)
    if values is None:
        return None if fill is None else _constant(float(fill), channels)
    return values.copy_to_host().astype(np.float64, copy=False)  # a device array


def to_host(a):
    """``a`` as a NumPy array (it is one here)."""
    return a


def moments(x3):
    """Statistics: per-channel float64 ``(shift, delta, M2)`` of ``x3``.

    ``shift`` is one value of each channel (its first), ``delta`` the mean minus it, ``M2`` the
    sum of squared deviations from the mean: a large common offset never enters a sum.
    """
    return _moments(x3, _blocks())


def forward_map(x3, y3, shift, delta, m2, gamma, beta, eps, residual3=None, relu=False):
    """Training forward's map, ``y = γ·(x − μ)/sqrt(σ² + eps) + β``, from ``moments(x3)``.

    Applied centred about the shift, which lies within the data (docs/design.md §3):
    ``a·(x − s) + (β − a·δ)``, where the folded ``a·x + (β − a·μ)`` would lose digits when
    |μ| ≫ σ. Fused, in float64 before the one rounding: ``+ residual3`` if given, then
    ``max(·, 0)`` if ``relu`` (NaN passes). Returns the float64 ``(mean, biased var, invstd)``.
    """
    return _forward_map(x3, y3, shift, delta, m2, gamma, beta, eps, _blocks(), residual3,
                        _floor(relu))


def normalize_with(x3, y3, mean, var, gamma, beta, eps, residual3=None, relu=False):
    """The map with given statistics (eval, ``fastbn.normalize``): ``y = γ·(x − mean)·invstd + β``
    with ``invstd = 1/sqrt(var + eps)``, which it returns; ``residual3`` and ``relu`` as in
    ``forward_map``."""
    return _normalize_with(x3, y3, mean, var, gamma, beta, eps, _blocks(), residual3,
                           _floor(relu))


def gradient_sums(dy3, x3, mean, y3=None):
    """Per-channel float64 ``(Σg, Σg·(x − mean))``, in one pass over dy and x, where ``g`` is dy,
    or, given the ReLU's output ``y3``, dy where ``y3 > 0`` and 0 elsewhere."""
    return _gradient_sums(dy3, x3, mean, _blocks(), y3)


def backward_map(dy3, x3, dx3, mean, invstd, gamma, sum_dy, sum_dy_xmu, count, training,
                 y3=None, dresidual3=None):
    """``dx`` of batch norm into ``dx3``, from the sums over the batch of ``count`` values per
    channel that the statistics came from (x's own, or a larger batch that x is part of).

    ``training`` says whether the statistics were the batch's, so that the gradient flows through
    them: ``dx = p·g + q·(x − μ) + r``; otherwise ``dx = p·g``, with ``p = γ·invstd``. ``g`` is
    dy, masked by ``y3 > 0`` if the ReLU's output ``y3`` is given (as ``gradient_sums``); it is
    written into ``dresidual3`` too if given (which may be ``dy3`` itself).
    """
    _backward_map(dy3, x3, dx3, mean, invstd, gamma, sum_dy, sum_dy_xmu, count, training,
                  _blocks(), y3, dresidual3)


def parameter_gradients(sum_dy, sum_dy_xmu, invstd, dtype):
    """``(dgamma, dbeta) = (Σdy·x̂, Σdy)`` in ``dtype``."""
    return (sum_dy_xmu * invstd).astype(dtype), sum_dy.astype(dtype)


def update_running(running_mean, running_var, mean, var, momentum, unbias):
    """PyTorch's update, in place: ``running = (1 − momentum)·running + momentum·batch``, with
    the unbiased ``var·unbias``; in float64, rounded once to the running arrays' dtype."""
    _update_running(running_mean, running_var, mean, var, momentum, unbias)


# The normalization family's steps (fastbn._norms): on the GroupView ``(rows, P, S)``, with
# parameter ``(r % groups)·P + p`` for element ``(r, p, s)``; gamma and beta float64 vectors of
# ``groups·P`` values; per-row statistics float64 vectors.


def _as_rows(a3):
    return a3.reshape(a3.shape[0], a3.shape[1] * a3.shape[2])


def group_forward(x3, y3, groups, gamma, beta, eps, centred):
    """Per-row statistics of ``x3`` and the map into ``y3``: ``(mean, var, invstd)``.

    ``centred``: mean and biased variance (about each row's first value, ``_row_moments``),
    ``y = γ·(x − μ)·invstd + β`` applied as ``a·(x − s) + (β − a·δ)``. Otherwise (RMS norm)
    ``var`` is the mean square, ``y = γ·x·invstd`` and ``mean`` is None.
    """
    stats = np.empty((3, x3.shape[0]))
    norm_rows(_as_rows(x3), _as_rows(y3), x3.shape[1], groups, gamma, beta, eps, centred, stats)
    return (stats[0] if centred else None), stats[1], stats[2]


def group_normalize_with(x3, y3, groups, mean, invstd, gamma, beta):
    """The map with given per-row statistics: ``y = γ·(x − mean)·invstd + β``."""
    _group_normalize_with(_as_rows(x3), _as_rows(y3), x3.shape[1], groups, mean, invstd, gamma,
                          beta, _blocks())


def group_backward(dy3, x3, dx3, groups, mean, invstd, gamma, training):
    """``dx`` into ``dx3``, and float64 ``(dgamma, dbeta) = (Σdy·x̂, Σdy)`` per parameter.

    ``training``: the gradient flows through the row statistics, ``dx = p·dy + q·(x − μ) + r``
    with ``p = γ·invstd``, ``q = −invstd³·Σγdy(x − μ)/L``, ``r = −invstd·Σγdy/L`` (``μ`` and ``r``
    0 when ``mean`` is None, RMS norm); otherwise ``dx = p·dy``.
    """
    grads = np.empty((2, groups * x3.shape[1]))
    norm_rows_backward(_as_rows(dy3), _as_rows(x3), _as_rows(dx3), x3.shape[1], groups, mean,
                       invstd, gamma, training, grads)
    return grads[0], grads[1]


def cast(a, dtype):
    """A float64 vector in ``dtype``."""
    return a.astype(dtype)


# The family's whole ops in one compiled call each, for fastbn._norms' lean path (and the steps
# above): rows ``x2`` of ``runs`` runs, statistics written into ``stats`` (3, rows), the parameter
# gradients into ``grads`` (2, parameters) in its dtype.


def norm_rows(x2, y2, runs, groups, gamma, beta, eps, centred, stats):
    _group_forward(x2, y2, runs, groups, gamma, beta, eps, centred, stats, _blocks())


def norm_rows_backward(dy2, x2, dx2, runs, groups, mean, invstd, gamma, training, grads):
    _group_backward(dy2, x2, dx2, runs, groups, mean, invstd, gamma, training, grads,
                    _blocks())
