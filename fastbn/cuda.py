"""The GPU device: fastbn.cpu's steps for arrays that live on an NVIDIA GPU (numba.cuda).

Imported only when a CUDA array or ``device="cuda"`` asks for it, so ``import fastbn`` never needs
CUDA.

Both device modules, this one and fastbn/cpu.py, expose the same steps, with the same names,
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
training forward map ``forward_map(x3, y3, s, δ, M2, γ, β, eps,             ``(μ, σ², invstd)``
                     residual3=None, relu=False)``
map with statistics  ``normalize_with(x3, y3, μ, σ², γ, β, eps,             ``invstd``
(eval, normalize)    residual3=None, relu=False)``
gradient sums        ``gradient_sums(dy3, x3, μ, y3=None)``                 ``(Σg, Σg·(x−μ))``
backward map         ``backward_map(dy3, x3, dx3, μ, invstd, γ, Σg,         –
                     Σg·(x−μ), count, training, y3=None, dresidual3=None)``
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
fastbn._layout.GroupView instead: statistics per row r over its P·S values, element (r, p, s)
scaled by parameter ``(r % groups)·P + p``; per-row vectors are float64 ``(R,)``, μ is None for
RMS norm (``centred`` False). A row gets a band of a block's threads (a whole block for long
rows), which merge in shared memory in a fixed tree.

The maps fuse a residual add and a ReLU (docs/design.md §1): ``y = relu(BN(x) + residual)`` in
float64 before the one rounding; backward's ``g`` is dy, or, given the ReLU's output ``y3``, dy
where ``y3 > 0`` and 0 elsewhere, and ``backward_map`` writes it into ``dresidual3`` if given
(which may be ``dy3`` itself). Without them, the plain kernels run, with the same bits as ever.

Here the steps are the methods of :class:`Steps`, one object per call (``for_call``), which holds
the call's stream, its GPU and its scratch memory; the module-level functions of the same names
run on the default stream of the current GPU. Every launch and copy of a call runs on its stream
(never stream 0 itself: the default stream as the legacy or per-thread stream object, so that
results bound to it name it), so fastbn makes no synchronizing call on the common path (CUDA
inputs and outputs): constants come from a per-context cache, the call's float64 vectors and
per-piece parts from one device allocation, and launches are configured once and reused
(``_launcher``).

The view is C-contiguous here (CUDA arrays must be; NumPy arrays are copied in so):

* reductions come in two layouts: *planar* (``inner > 1``) gives a block one chunk of one channel,
  whose threads read consecutive values of a run; *rows* (``inner == 1``: N×D, channels-last)
  gives a block a segment of rows and up to ``COLUMNS`` consecutive channels (fewer for narrow
  rows, so that C = 3 still keeps the lanes busy), so a warp reads along a row. Either way reads
  are coalesced;
* maps read the view as rows, threads along a row and blocks down the rows; a block covers
  several narrow rows at once.

Numerics as on the CPU (docs/design.md §3): float64 arithmetic, statistics of ``x − s`` with ``s``
one value of the channel; each thread sums its values in tiles of ``TILE`` about the tile's first
value (the CPU's rows rule, without a division per value) and merges the tiles with Chan et al.'s
formula (fastbn.cpu.chan, compiled for the device); a block merges its threads' in shared memory
in a fixed tree order, and a second small kernel merges the blocks' in block order. No
floating-point atomics, so results are deterministic. Indices are 64-bit, so tensors of more
than 2**31 values work.

The block sizes are read at call time (kernels are built per size), so tests can shrink them to run
the multi-block merges on small shapes.
"""
import contextlib
import ctypes
import functools
import math
import numbers
import threading
import warnings

import numba
import numpy as np
from numba import cuda, float64, int64

from . import cpu
from ._arrays import interface, is_cuda_array
from ._layout import ChannelView

THREADS = 256  # threads per block, a power of two
COLUMNS = 32  # rows kernels: channels a block covers at most (a warp reads 32 consecutive values)
CHUNK = 1 << 15  # planar: values of one channel a block reduces (more when a channel is huge)
SEGMENT = 1 << 10  # rows: rows a block reduces (more when there are very many rows)
TILE = 32  # values a thread sums about one first value before a Chan merge (cpu.TILE_ROWS's rule)
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y, which counts the pieces of a channel

_SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

# The per-channel formulas are the CPU's, compiled for the device. numba.cuda has no np.sqrt, so
# the forward one is restated with math.sqrt (the same correctly rounded operation).
_backward_coefficients = cuda.jit(device=True)(cpu._backward_coefficients)
_chan = cuda.jit(device=True)(cpu.chan)


@cuda.jit(device=True)
def _forward_coefficients(m2, count, gamma, beta, delta, eps):
    """cpu._forward_coefficients: ``(invstd, a, b)`` of ``y = a·(x − s) + b``, δ = μ − s."""
    invstd = 1.0 / math.sqrt(m2 / count + eps)
    a = gamma * invstd
    return invstd, a, beta - a * delta


# -- a thread's moments: tiles of plain sums, merged ----------------------------------------------
#
# A tile's deviations are taken from its first value, so the cancellation in Σt² − (Σt)²/n is
# bounded by the tile's own spread (Samuelson's inequality, as for the CPU's rows tiles,
# docs/design.md §3.2), and the only divisions are the merge's, once per tile.


@cuda.jit(device=True)
def _tile_merge(n, mean, m2, count, first, total, squares):
    """(n, mean, M2) merged with a tile of ``count`` values d, ``total = Σ(d − first)`` and
    ``squares = Σ(d − first)²``."""
    step = total / count
    tile_m2 = squares - total * step
    if tile_m2 < 0.0:  # noqa: PLR1730 - rounding; the comparison lets NaN through (max would not)
        tile_m2 = 0.0
    return _chan(n, mean, m2, count, first + step, tile_m2)


@cuda.jit(device=True)
def _tile_add(n, mean, m2, count, first, total, squares, d, tile):
    """Add ``d`` to the open tile; a full tile (``tile`` values) is merged into (n, mean, M2)."""
    if count == 0.0:
        first = d
    t = d - first
    total += t
    squares += t * t
    count += 1.0
    if count == tile:
        n, mean, m2 = _tile_merge(n, mean, m2, count, first, total, squares)
        count = total = squares = 0.0
    return n, mean, m2, count, first, total, squares


@cuda.jit(device=True)
def _tile_close(n, mean, m2, count, first, total, squares):
    """(n, mean, M2) with the last, partly filled tile merged in."""
    if count > 0.0:
        return _tile_merge(n, mean, m2, count, first, total, squares)
    return n, mean, m2


@functools.lru_cache(maxsize=None)
def _kernels(threads, columns, tile):
    """The kernels for blocks of ``threads`` threads (rows kernels: ``columns`` × the rest) whose
    threads sum ``tile`` values at a time."""
    lanes = threads // columns  # rows kernels: threads per column, down the rows

    @cuda.jit(device=True)
    def merge_moments(n, mean, m2, sn, smean, sm2, t, width):
        """Merge the moments of threads ``t, t + width, ...`` of the block into thread ``t``'s."""
        sn[t], smean[t], sm2[t] = n, mean, m2
        cuda.syncthreads()
        stride = threads // 2
        while stride >= width:
            if t < stride:
                sn[t], smean[t], sm2[t] = _chan(sn[t], smean[t], sm2[t],
                                               sn[t + stride], smean[t + stride], sm2[t + stride])
            cuda.syncthreads()
            stride //= 2
        return sn[t], smean[t], sm2[t]

    @cuda.jit(device=True)
    def add_sums(a, b, sa, sb, t, width):
        """Add the sums of threads ``t, t + width, ...`` into thread ``t``'s, in a fixed tree."""
        sa[t], sb[t] = a, b
        cuda.syncthreads()
        stride = threads // 2
        while stride >= width:
            if t < stride:
                sa[t] += sa[t + stride]
                sb[t] += sb[t + stride]
            cuda.syncthreads()
            stride //= 2
        return sa[t], sb[t]

    @cuda.jit(device=True)
    def planar_place(x, chunk):
        """``(c, j, t, k, stop, o, i, runs, rest)``: a planar block's channel and chunk, the
        thread, its first value ``k`` of the channel (run ``o``, place ``i``), the chunk's end,
        and a block's worth of values as ``runs`` whole runs plus ``rest`` places."""
        c = cuda.blockIdx.x
        j = int64(cuda.blockIdx.y)
        t = cuda.threadIdx.x
        inner = int64(x.shape[2])
        start = j * chunk
        k = start + t
        o = k // inner
        runs = threads // inner
        return (c, j, t, k, min(start + chunk, int64(x.shape[0]) * inner), o, k - o * inner, runs,
                threads - runs * inner)

    @cuda.jit(device=True)
    def planar_next(k, o, i, inner, runs, rest):
        """The thread's next value, a block further on: the run and place stepped without a
        division (``rest < inner``, so one carry at most)."""
        i += rest
        o += runs
        if i >= inner:
            i -= inner
            o += 1
        return k + threads, o, i

    @cuda.jit(device=True)
    def rows_place(x, segment):
        """``(tx, ty, t, c, g, r, stop)``: a rows block's thread (column ``tx``, lane ``ty``,
        linear ``t``), its channel, the segment, its first row and the segment's end."""
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        g = int64(cuda.blockIdx.y)
        return (tx, ty, ty * columns + tx, int64(cuda.blockIdx.x) * columns + tx, g,
                g * segment + ty, min(g * segment + segment, x.shape[0]))

    @cuda.jit
    def planar_moments(x, shift, chunk, counts, means, m2s):
        c, j, t, k, stop, o, i, runs, rest = planar_place(x, chunk)
        inner = x.shape[2]
        s = shift[c]
        n = mean = m2 = count = first = total = squares = 0.0
        while k < stop:
            n, mean, m2, count, first, total, squares = _tile_add(
                n, mean, m2, count, first, total, squares, float64(x[o, c, i]) - s, tile)
            k, o, i = planar_next(k, o, i, inner, runs, rest)
        n, mean, m2 = _tile_close(n, mean, m2, count, first, total, squares)
        sn = cuda.shared.array(threads, float64)
        smean = cuda.shared.array(threads, float64)
        sm2 = cuda.shared.array(threads, float64)
        n, mean, m2 = merge_moments(n, mean, m2, sn, smean, sm2, t, 1)
        if t == 0:
            counts[j, c], means[j, c], m2s[j, c] = n, mean, m2

    @cuda.jit
    def rows_moments(x, shift, segment, counts, means, m2s):
        tx, ty, t, c, g, r, stop = rows_place(x, segment)
        channels = x.shape[1]
        n = mean = m2 = count = first = total = squares = 0.0
        if c < channels:
            s = shift[c]
            while r < stop:
                n, mean, m2, count, first, total, squares = _tile_add(
                    n, mean, m2, count, first, total, squares, float64(x[r, c]) - s, tile)
                r += lanes
            n, mean, m2 = _tile_close(n, mean, m2, count, first, total, squares)
        sn = cuda.shared.array(threads, float64)
        smean = cuda.shared.array(threads, float64)
        sm2 = cuda.shared.array(threads, float64)
        n, mean, m2 = merge_moments(n, mean, m2, sn, smean, sm2, t, columns)
        if ty == 0 and c < channels:
            counts[g, c], means[g, c], m2s[g, c] = n, mean, m2

    def grad_sums(masked):
        """A thread's ``(Σg, Σg·(x − mean))`` over its values of a planar chunk and of a rows
        segment, with ``g = dy``, or (``masked``) dy where the ReLU's output ``y > 0`` and 0
        elsewhere (also where dy is NaN, as PyTorch's threshold_backward)."""

        @cuda.jit(device=True)
        def planar(dy, x, y, mean, chunk):
            c, j, t, k, stop, o, i, runs, rest = planar_place(x, chunk)
            inner = x.shape[2]
            m = mean[c]
            a = b = 0.0
            while k < stop:
                g = float64(dy[o, c, i])
                if masked:
                    g = g if y[o, c, i] > 0.0 else 0.0
                a += g
                b += g * (float64(x[o, c, i]) - m)
                k, o, i = planar_next(k, o, i, inner, runs, rest)
            return c, j, t, a, b

        @cuda.jit(device=True)
        def rows(dy, x, y, mean, segment):
            _, ty, t, c, g, r, stop = rows_place(x, segment)
            a = b = 0.0
            if c < x.shape[1]:
                m = mean[c]
                while r < stop:
                    v = float64(dy[r, c])
                    if masked:
                        v = v if y[r, c] > 0.0 else 0.0
                    a += v
                    b += v * (float64(x[r, c]) - m)
                    r += lanes
            return ty, t, c, g, a, b

        return planar, rows

    planar_sums, rows_sums = grad_sums(False)
    planar_masked_sums, rows_masked_sums = grad_sums(True)

    @cuda.jit(device=True)
    def planar_total(c, j, t, a, b, sums_dy, sums_dy_xmu, sa, sb):
        """The block's sums of a planar chunk, written by its thread 0."""
        a, b = add_sums(a, b, sa, sb, t, 1)
        if t == 0:
            sums_dy[j, c], sums_dy_xmu[j, c] = a, b

    @cuda.jit(device=True)
    def rows_total(ty, t, c, g, a, b, channels, sums_dy, sums_dy_xmu, sa, sb):
        """The block's sums of a rows segment, per column, written by its lanes 0."""
        a, b = add_sums(a, b, sa, sb, t, columns)
        if ty == 0 and c < channels:
            sums_dy[g, c], sums_dy_xmu[g, c] = a, b

    # The plain kernels read dy where the masked ones read y (a name the plain bodies ignore),
    # so that they keep their arguments: the ReLU costs the plain backward nothing.
    @cuda.jit
    def planar_grad_sums(dy, x, mean, chunk, sums_dy, sums_dy_xmu):
        sa = cuda.shared.array(threads, float64)
        sb = cuda.shared.array(threads, float64)
        c, j, t, a, b = planar_sums(dy, x, dy, mean, chunk)
        planar_total(c, j, t, a, b, sums_dy, sums_dy_xmu, sa, sb)

    @cuda.jit
    def rows_grad_sums(dy, x, mean, segment, sums_dy, sums_dy_xmu):
        sa = cuda.shared.array(threads, float64)
        sb = cuda.shared.array(threads, float64)
        ty, t, c, g, a, b = rows_sums(dy, x, dy, mean, segment)
        rows_total(ty, t, c, g, a, b, x.shape[1], sums_dy, sums_dy_xmu, sa, sb)

    @cuda.jit
    def planar_masked_grad_sums(dy, x, y, mean, chunk, sums_dy, sums_dy_xmu):
        sa = cuda.shared.array(threads, float64)
        sb = cuda.shared.array(threads, float64)
        c, j, t, a, b = planar_masked_sums(dy, x, y, mean, chunk)
        planar_total(c, j, t, a, b, sums_dy, sums_dy_xmu, sa, sb)

    @cuda.jit
    def rows_masked_grad_sums(dy, x, y, mean, segment, sums_dy, sums_dy_xmu):
        sa = cuda.shared.array(threads, float64)
        sb = cuda.shared.array(threads, float64)
        ty, t, c, g, a, b = rows_masked_sums(dy, x, y, mean, segment)
        rows_total(ty, t, c, g, a, b, x.shape[1], sums_dy, sums_dy_xmu, sa, sb)

    return (planar_moments, rows_moments, planar_grad_sums, rows_grad_sums,
            planar_masked_grad_sums, rows_masked_grad_sums)


# -- per-channel kernels: one thread per channel ------------------------------------------------


@cuda.jit
def _merge_moments(counts, means, m2s, mean, m2):
    """Merge the pieces' moments ``(pieces, C)`` in piece order, for every channel."""
    c = cuda.grid(1)
    if c < mean.size:
        n, mc, m2c = 0.0, 0.0, 0.0
        for j in range(counts.shape[0]):
            n, mc, m2c = _chan(n, mc, m2c, counts[j, c], means[j, c], m2s[j, c])
        mean[c] = mc
        m2[c] = m2c


@cuda.jit
def _add_partials(parts_a, parts_b, total_a, total_b):
    """Add the pieces' sums ``(pieces, C)`` in piece order, for every channel."""
    c = cuda.grid(1)
    if c < total_a.size:
        a = b = 0.0
        for j in range(parts_a.shape[0]):
            a += parts_a[j, c]
            b += parts_b[j, c]
        total_a[c] = a
        total_b[c] = b


@cuda.jit
def _forward_maps(shift, delta, m2, count, gamma, beta, eps, mean, var, invstd, scale, bias):
    """The statistics ``mean = s + δ``, ``var = M2/count`` and the map's coefficients."""
    c = cuda.grid(1)
    if c < delta.size:
        mean[c] = shift[c] + delta[c]
        var[c] = m2[c] / count
        invstd[c], scale[c], bias[c] = _forward_coefficients(m2[c], count, gamma[c], beta[c],
                                                             delta[c], eps)


@cuda.jit
def _backward_maps(sum_dy, sum_dy_xmu, count, gamma, invstd, p, q, r):
    c = cuda.grid(1)
    if c < p.size:
        p[c], q[c], r[c] = _backward_coefficients(sum_dy[c], sum_dy_xmu[c], count, gamma[c],
                                                  invstd[c])


@cuda.jit
def _parameter_gradients(sum_dy, sum_dy_xmu, invstd, dgamma, dbeta):
    c = cuda.grid(1)
    if c < dgamma.size:
        dgamma[c] = sum_dy_xmu[c] * invstd[c]
        dbeta[c] = sum_dy[c]


@cuda.jit
def _update_running(running_mean, running_var, mean, var, momentum, unbias):
    c = cuda.grid(1)
    if c < mean.size:
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c]
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * var[c] * unbias


@cuda.jit
def _first_values(x3, shift):
    """``shift[c] = x[0, c, 0]``: one value of each channel."""
    c = cuda.grid(1)
    if c < shift.size:
        shift[c] = x3[0, c, 0]


@cuda.jit
def _cast(source, target):
    """``target[:] = source`` in target's dtype (per-channel vectors)."""
    c = cuda.grid(1)
    if c < target.size:
        target[c] = source[c]


# -- elementwise maps, over the view as rows ----------------------------------------------------
#
# The maps see the view as a 2-D array: ``(outer·C, inner)`` rows of one channel each (planar) or
# ``(outer, C)`` rows of every channel (rows). Threads run along a row (coalesced), blocks down the
# rows, so the channel of a value costs one integer modulo per row, not a division per value. A row
# narrower than a block gets ``per_row`` threads, and the block covers several rows at once.


def _row_map(value, fused=False):
    """A kernel ``(out, a, b, channels, planar, centre, p, q, r, per_row)`` that writes
    ``out = value(a, b, row, w, c, centre, p, q, r)`` over the view read as rows: a grid-stride
    loop along and down.

    ``fused``: a kernel ``(out, out2, a, b, e, channels, ...)``, the same loop, that calls
    ``value(out, out2, a, b, e, row, w, c, ...)``, which stores its results itself: a fused map
    reads a third array ``e`` and may write a second one ``out2``. A kernel of its own, so that
    the plain maps keep their code and their arguments (each array costs every launch host time).
    """

    @cuda.jit
    def kernel(out, a, b, channels, planar, centre, p, q, r, per_row):
        rows, width = out.shape
        band = cuda.blockDim.x // per_row  # rows a block covers at once
        t = cuda.threadIdx.x
        lane_row = t // per_row  # once per thread: the loops below never divide
        if lane_row < band:
            first = int64(cuda.blockIdx.x) * per_row + (t - lane_row * per_row)
            step = int64(cuda.gridDim.x) * per_row
            row = int64(cuda.blockIdx.y) * band + lane_row
            row_step = int64(cuda.gridDim.y) * band
            while row < rows:
                row_channel = row % channels
                w = first
                while w < width:
                    c = row_channel if planar else w
                    out[row, w] = value(a, b, row, w, c, centre, p, q, r)
                    w += step
                row += row_step

    @cuda.jit
    def fused_kernel(out, out2, a, b, e, channels, planar, centre, p, q, r, per_row):
        rows, width = out.shape
        band = cuda.blockDim.x // per_row
        t = cuda.threadIdx.x
        lane_row = t // per_row
        if lane_row < band:
            first = int64(cuda.blockIdx.x) * per_row + (t - lane_row * per_row)
            step = int64(cuda.gridDim.x) * per_row
            row = int64(cuda.blockIdx.y) * band + lane_row
            row_step = int64(cuda.gridDim.y) * band
            while row < rows:
                row_channel = row % channels
                w = first
                while w < width:
                    c = row_channel if planar else w
                    value(out, out2, a, b, e, row, w, c, centre, p, q, r)
                    w += step
                row += row_step

    return fused_kernel if fused else kernel


@cuda.jit(device=True)
def _scaled(a, b, row, w, c, centre, p, q, r):
    """The forward map (and eval backward's): ``q·(b − centre) + r``; ``a`` and ``p`` unused."""
    return q[c] * (float64(b[row, w]) - centre[c]) + r[c]


@cuda.jit(device=True)
def _gradient(a, b, row, w, c, centre, p, q, r):
    """Training backward's map: ``p·a + q·(b − centre) + r``, a = dy, b = x."""
    return p[c] * float64(a[row, w]) + q[c] * (float64(b[row, w]) - centre[c]) + r[c]


_affine = _row_map(_scaled)
_grad_map = _row_map(_gradient)


# The fused maps (docs/design.md §1, "Fused activation and residual"): a kernel per combination,
# built on first use, whose flags are constants of the compiled code. Each computes the plain map's
# expression, so that its bits are the plain map's up to the fused part.


@functools.cache
def _fused_forward(residual, relu):
    """The forward map ``_scaled``, then ``+ e`` (``residual``: e is the residual), then ReLU
    (``relu``: 0.0 where the value is < 0, so NaN passes, as in PyTorch); one rounding, in the
    store. ``out2`` unused."""

    @cuda.jit(device=True)
    def store(out, out2, a, b, e, row, w, c, centre, p, q, r):
        v = _scaled(a, b, row, w, c, centre, p, q, r)
        if residual:
            v = v + float64(e[row, w])
        if relu:
            v = 0.0 if v < 0.0 else v  # noqa: FURB136 - max would drop NaN (fmax)
        out[row, w] = v

    return _row_map(store, fused=True)


@functools.cache
def _fused_backward(training, mask, second):
    """Backward's map of ``g``: dy (``a``), or (``mask``) dy where the ReLU's output ``e > 0`` and
    0 elsewhere (also where dy is NaN, as PyTorch's threshold_backward). ``training``:
    ``_gradient``'s ``p·g + q·(b − centre) + r`` (b = x), else eval's ``_scaled``,
    ``q·(g − centre) + r``; ``second``: g also into ``out2`` (dresidual, which may be dy itself:
    each value is read before it is written)."""

    @cuda.jit(device=True)
    def store(out, out2, a, b, e, row, w, c, centre, p, q, r):
        g = float64(a[row, w])
        if mask:
            g = g if e[row, w] > 0.0 else 0.0
        if training:
            out[row, w] = p[c] * g + q[c] * (float64(b[row, w]) - centre[c]) + r[c]
        else:
            out[row, w] = q[c] * (g - centre[c]) + r[c]
        if second:
            out2[row, w] = g

    return _row_map(store, fused=True)


def _as_rows(a3):
    """``(rows, planar)``: the view as the maps read it."""
    outer, channels, inner = a3.shape
    if inner > 1:
        return a3.reshape(outer * channels, inner), True
    return a3.reshape(outer, channels), False


def _map_launch(rows):
    """``(grid, block, per_row)`` of a map over ``rows`` (not empty)."""
    height, width = rows.shape
    per_row = min(THREADS, width)
    band = THREADS // per_row
    return ((max(1, min(-(-width // per_row), 1024)), max(1, min(-(-height // band), MAX_GRID_Y))),
            THREADS, per_row)


# -- the normalization family: statistics per row of a (rows, P, S) view -----------------------
#
# Layer, group, instance and RMS norm (docs/design.md §2.5) view x as ``(R, P, S)``: statistics
# per row r over its L = P·S contiguous values, element (r, p, s) scaled by parameter
# c = (r % groups)·P + p. The row reductions give each row ``width`` threads of a block (the
# row's length rounded up to a power of two, at most a block), so that a block reduces one long
# row, or several short ones side by side; the threads stride along the row (coalesced) and the
# block merges them in shared memory in a fixed tree, a band of ``width`` threads per row. The
# blocks stride down the rows (at most ``ROW_BLOCKS`` of them). Parameter gradients are per-row
# (or per-run) partial sums added over the rows in row order by a second kernel. No atomics:
# every result is bitwise reproducible.

ROW_BLOCKS = 1 << 15  # family reductions: blocks at most; a larger grid strides down the rows


@functools.cache
def _group_kernels(threads, tile):
    """The family's row reductions for blocks of ``threads`` threads whose threads sum ``tile``
    values at a time about the tile's first value."""

    @cuda.jit(device=True)
    def place(width):
        """``(t, lane, band, base, step)``: the thread, its place in its row's band of
        ``width`` threads, the band, and the block's first row and stride down the rows."""
        t = cuda.threadIdx.x
        band = t // width
        bands = threads // width
        return (t, t - band * width, band, int64(cuda.blockIdx.x) * bands,
                int64(cuda.gridDim.x) * bands)

    @cuda.jit(device=True)
    def band_moments(n, mean, m2, sn, smean, sm2, t, lane, width):
        """Merge the moments of a band's threads into its first (lane 0), in a fixed tree."""
        sn[t], smean[t], sm2[t] = n, mean, m2
        cuda.syncthreads()
        stride = width // 2
        while stride >= 1:
            if lane < stride:
                sn[t], smean[t], sm2[t] = _chan(sn[t], smean[t], sm2[t],
                                               sn[t + stride], smean[t + stride], sm2[t + stride])
            cuda.syncthreads()
            stride //= 2
        return sn[t], smean[t], sm2[t]

    @cuda.jit(device=True)
    def band_sums(a, b, sa, sb, t, lane, width):
        """Add a band's sums into its first thread, in a fixed tree."""
        sa[t], sb[t] = a, b
        cuda.syncthreads()
        stride = width // 2
        while stride >= 1:
            if lane < stride:
                sa[t] += sa[t + stride]
                sb[t] += sb[t + stride]
            cuda.syncthreads()
            stride //= 2
        return sa[t], sb[t]

    @cuda.jit
    def row_moments(x, width, eps, shift, delta, mean, var, invstd):
        """Per row of ``x`` (R, L): ``s`` (its first value), ``δ = mean − s`` and ``M2`` of
        ``x − s``, exactly; the row's ``mean``, biased ``var`` and ``invstd``."""
        rows, length = x.shape
        t, lane, band, base, step = place(width)
        sn = cuda.shared.array(threads, float64)
        smean = cuda.shared.array(threads, float64)
        sm2 = cuda.shared.array(threads, float64)
        while base < rows:  # the same trips for every thread of the block (syncthreads)
            r = base + band
            s = n = mu = m2 = count = first = total = squares = 0.0
            if r < rows:
                s = float64(x[r, 0])
                k = int64(lane)
                while k < length:
                    n, mu, m2, count, first, total, squares = _tile_add(
                        n, mu, m2, count, first, total, squares, float64(x[r, k]) - s, tile)
                    k += width
                n, mu, m2 = _tile_close(n, mu, m2, count, first, total, squares)
            n, mu, m2 = band_moments(n, mu, m2, sn, smean, sm2, t, lane, width)
            if lane == 0 and r < rows:
                v = m2 / length
                shift[r], delta[r], mean[r], var[r] = s, mu, s + mu, v
                invstd[r] = 1.0 / math.sqrt(v + eps)
            base += step

    @cuda.jit
    def row_squares(x, width, eps, var, invstd):
        """RMS norm: per row of ``x`` (R, L), the mean square ``var`` and ``invstd``."""
        rows, length = x.shape
        t, lane, band, base, step = place(width)
        sa = cuda.shared.array(threads, float64)
        sb = cuda.shared.array(threads, float64)
        while base < rows:
            r = base + band
            a = 0.0
            if r < rows:
                k = int64(lane)
                while k < length:
                    v = float64(x[r, k])
                    a += v * v
                    k += width
            a, _ = band_sums(a, 0.0, sa, sb, t, lane, width)
            if lane == 0 and r < rows:
                v = a / length
                var[r] = v
                invstd[r] = 1.0 / math.sqrt(v + eps)
            base += step

    @cuda.jit
    def row_gradient_terms(dy, x, gamma, mean, invstd, groups, centred, width, q, r0):
        """A parameter per value (S = 1; ``dy``, ``x`` as (R, P)): per row, ``A = Σγ·dy`` and
        ``B = Σγ·dy·(x − μ)`` (x for RMS norm, ``centred`` False), and training backward's
        ``q = −invstd³·B/L``, ``r0 = −invstd·A/L`` (0 for RMS norm)."""
        rows, length = x.shape
        t, lane, band, base, step = place(width)
        sa = cuda.shared.array(threads, float64)
        sb = cuda.shared.array(threads, float64)
        while base < rows:
            r = base + band
            a = b = 0.0
            if r < rows:
                m = mean[r] if centred else 0.0
                first = (r % groups) * length
                k = int64(lane)
                while k < length:
                    g = gamma[first + k] * float64(dy[r, k])
                    a += g
                    b += g * (float64(x[r, k]) - m)
                    k += width
            a, b = band_sums(a, b, sa, sb, t, lane, width)
            if lane == 0 and r < rows:
                p = invstd[r]
                q[r] = -p * p * p * b / length
                r0[r] = -p * a / length if centred else 0.0
            base += step

    @cuda.jit
    def run_sums(dy, x, mean, runs, centred, width, sum_dy, sum_dy_xmu):
        """A parameter per run (S > 1; ``dy``, ``x`` as (R·P, S)): per run ``j`` of row
        ``j // runs``, ``Σdy`` and ``Σdy·(x − μ)`` (x for RMS norm)."""
        total, length = x.shape
        t, lane, band, base, step = place(width)
        sa = cuda.shared.array(threads, float64)
        sb = cuda.shared.array(threads, float64)
        while base < total:
            j = base + band
            a = b = 0.0
            if j < total:
                m = mean[j // runs] if centred else 0.0
                k = int64(lane)
                while k < length:
                    g = float64(dy[j, k])
                    a += g
                    b += g * (float64(x[j, k]) - m)
                    k += width
            a, b = band_sums(a, b, sa, sb, t, lane, width)
            if lane == 0 and j < total:
                sum_dy[j], sum_dy_xmu[j] = a, b
            base += step

    return row_moments, row_squares, row_gradient_terms, run_sums


@cuda.jit
def _run_gradient_terms(sum_dy, sum_dy_xmu, gamma, invstd, groups, runs, length, centred, q,
                        r0):
    """Per row from its runs' sums (in run order): ``A = Σγ·Σdy``, ``B = Σγ·Σdy·(x − μ)``, and
    training backward's ``q``, ``r0`` as ``row_gradient_terms``'."""
    r = cuda.grid(1)
    if r < q.size:
        first = int64(r) * runs
        c0 = (r % groups) * runs
        a = b = 0.0
        for p in range(runs):
            g = gamma[c0 + p]
            a += g * sum_dy[first + p]
            b += g * sum_dy_xmu[first + p]
        v = invstd[r]
        q[r] = -v * v * v * b / length
        r0[r] = -v * a / length if centred else 0.0


@cuda.jit
def _run_parameter_gradients(sum_dy, sum_dy_xmu, invstd, groups, runs, dgamma, dbeta):
    """Per parameter c, over the rows n of the runs' sums read as (R / groups, C), in row order:
    ``dγ = Σ Σdy·(x − μ)·invstd``, ``dβ = Σ Σdy``."""
    c = cuda.grid(1)
    if c < dgamma.size:
        parameters = dgamma.size
        g = 0.0
        b = 0.0
        for n in range(sum_dy.size // parameters):
            j = int64(n) * parameters + c
            g += sum_dy_xmu[j] * invstd[int64(n) * groups + c // runs]
            b += sum_dy[j]
        dgamma[c] = g
        dbeta[c] = b


@cuda.jit
def _column_parameter_gradients(dy, x, mean, invstd, groups, runs, centred, segment, parts_g,
                                parts_b):
    """A parameter per value (S = 1; ``dy``, ``x`` as (R / groups, C)): per column c and segment
    j of rows, ``Σdy·x̂`` and ``Σdy`` in row order (a thread per column: reads coalesced)."""
    c = cuda.grid(1)
    parameters = x.shape[1]
    if c < parameters:
        j = int64(cuda.blockIdx.y)
        n = j * segment
        stop = n + segment
        if stop > x.shape[0]:  # noqa: PLR1730
            stop = x.shape[0]
        which = c // runs
        g = 0.0
        b = 0.0
        while n < stop:
            r = n * groups + which
            v = float64(dy[n, c])
            m = mean[r] if centred else 0.0
            g += v * (float64(x[n, c]) - m) * invstd[r]
            b += v
            n += 1
        parts_g[j, c] = g
        parts_b[j, c] = b


def _group_map(value):
    """A map kernel ``(out, a, b, u, v, z, e, gamma, beta, runs, groups, planar, per_row)`` that
    writes ``out = value(a, b, row, w, r, c, u, v, z, e, gamma, beta)`` over the view read as
    rows: ``(R·P, S)`` (``planar``, S > 1: the row r and parameter c of a whole run) or
    ``(R, P)`` (c along the row); a grid-stride loop along and down as ``_row_map``'s."""

    @cuda.jit
    def kernel(out, a, b, u, v, z, e, gamma, beta, runs, groups, planar, per_row):
        rows, width = out.shape
        band = cuda.blockDim.x // per_row
        t = cuda.threadIdx.x
        lane_row = t // per_row
        if lane_row < band:
            first = int64(cuda.blockIdx.x) * per_row + (t - lane_row * per_row)
            step = int64(cuda.gridDim.x) * per_row
            row = int64(cuda.blockIdx.y) * band + lane_row
            row_step = int64(cuda.gridDim.y) * band
            parameters = groups * runs
            while row < rows:
                if planar:
                    r = row // runs
                    c0 = row % parameters
                else:
                    r = row
                    c0 = (row % groups) * runs
                w = first
                while w < width:
                    c = c0 if planar else c0 + w
                    out[row, w] = value(a, b, row, w, r, c, u, v, z, e, gamma, beta)
                    w += step
                row += row_step

    return kernel


@cuda.jit(device=True)
def _group_centred(a, b, row, w, r, c, u, v, z, e, gamma, beta):
    """Forward: ``y = s·(x − shift) + (β − s·δ)``, ``s = γ·invstd`` (u: invstd, v: shift, z: δ);
    a constant row gives exactly β."""
    s = gamma[c] * u[r]
    return s * (float64(a[row, w]) - v[r]) + (beta[c] - s * z[r])


@cuda.jit(device=True)
def _group_scaled(a, b, row, w, r, c, u, v, z, e, gamma, beta):
    """RMS norm's forward, ``y = (γ·invstd)·x`` (u: invstd), and eval backward's
    ``dx = (γ·invstd)·dy``."""
    return (gamma[c] * u[r]) * float64(a[row, w])


@cuda.jit(device=True)
def _group_with(a, b, row, w, r, c, u, v, z, e, gamma, beta):
    """The map with given statistics: ``y = (γ·invstd)·(x − μ) + β`` (u: invstd, v: μ)."""
    return (gamma[c] * u[r]) * (float64(a[row, w]) - v[r]) + beta[c]


@cuda.jit(device=True)
def _group_gradient(a, b, row, w, r, c, u, v, z, e, gamma, beta):
    """Training backward: ``dx = (γ·invstd)·dy + (q·(x − μ) + r0)`` (a: dy, b: x, u: invstd,
    v: q, z: μ, e: r0)."""
    return (gamma[c] * u[r]) * float64(a[row, w]) + (v[r] * (float64(b[row, w]) - z[r]) + e[r])


@cuda.jit(device=True)
def _group_rms_gradient(a, b, row, w, r, c, u, v, z, e, gamma, beta):
    """RMS norm's training backward: ``dx = (γ·invstd)·dy + q·x`` (u: invstd, v: q)."""
    return (gamma[c] * u[r]) * float64(a[row, w]) + v[r] * float64(b[row, w])


_group_centred_map = _group_map(_group_centred)
_group_scaled_map = _group_map(_group_scaled)
_group_with_map = _group_map(_group_with)
_group_gradient_map = _group_map(_group_gradient)
_group_rms_gradient_map = _group_map(_group_rms_gradient)


def _group_rows(a3):
    """``(rows, planar)``: a ``(R, P, S)`` view as the family's maps read it."""
    rows, runs, inner = a3.shape
    if inner > 1:
        return a3.reshape(rows * runs, inner), True
    return a3.reshape(rows, runs), False


def _band_launch(rows, length):
    """``(blocks, width)`` of a family reduction over ``rows`` rows of ``length`` values: a
    band of ``width`` threads per row (a power of two, at most a block)."""
    width = min(THREADS, 1 << max(0, length - 1).bit_length())
    return max(1, min(-(-rows // (THREADS // width)), ROW_BLOCKS)), width


# -- launch configurations ----------------------------------------------------------------------


def _grid(n):
    """Launch configuration of a per-channel kernel: a thread per channel."""
    return max(1, -(-n // THREADS)), THREADS


def _pieces(shape):
    """``(planar, piece, pieces)``: how the reductions cut each channel of an ``(outer, C, inner)``
    view."""
    outer, _, inner = shape
    if inner > 1:
        total = outer * inner
        chunk = max(CHUNK, -(-total // MAX_GRID_Y))
        return True, chunk, -(-total // chunk)
    segment = max(SEGMENT, -(-outer // MAX_GRID_Y))
    return False, segment, -(-outer // segment)


def _reduce_launch(x3):
    """``(kernels, planar, piece, pieces, grid, block)`` of a reduction over ``x3``."""
    planar, piece, pieces = _pieces(x3.shape)
    channels = x3.shape[1]
    if planar:
        kernels = _kernels(THREADS, min(COLUMNS, THREADS), TILE)
        return kernels, planar, piece, pieces, (channels, pieces), THREADS
    # Rows: as many columns as the rows have channels, rounded up to a power of two (at most
    # COLUMNS), so that narrow rows (C = 3) give the other lanes more rows instead.
    columns = min(COLUMNS, THREADS, 1 << max(0, channels - 1).bit_length())
    return (_kernels(THREADS, columns, TILE), planar, piece, pieces,
            (-(-channels // columns), pieces), (columns, THREADS // columns))


# -- streams, GPUs and device views ---------------------------------------------------------------
#
# Numba's CUDA simulator has neither external streams nor a way to import a
# __cuda_array_interface__ (its "device" memory is host memory); the stand-ins below let the tests
# run those paths there.


class _SimulatedStream:
    """The simulator's stand-in for ``cuda.external_stream(handle)`` (and the default streams)."""

    def __init__(self, handle):
        self.handle = handle

    def __int__(self):
        return self.handle

    def synchronize(self):
        pass


_LEGACY, _PER_THREAD = 1, 2  # CU_STREAM_LEGACY, CU_STREAM_PER_THREAD: the default streams' handles


def _per_thread_default():
    """Whether numba.cuda runs unbound work on the per-thread default stream
    (NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM) rather than the legacy one."""
    try:
        from numba.cuda.core import config  # numba-cuda
    except ImportError:
        from numba.core import config
    return bool(getattr(config, "CUDA_PER_THREAD_DEFAULT_STREAM", False))


def _stream(handle):
    """The Numba stream of a handle: 0 is the default stream, as the legacy (1) or per-thread (2)
    default stream object, whose handle an array bound to it exports; needs the GPU's context."""
    if handle == 0:
        handle = _PER_THREAD if _per_thread_default() else _LEGACY
    if _SIMULATOR:
        return _SimulatedStream(handle)
    if handle == _LEGACY:
        return cuda.legacy_default_stream()
    if handle == _PER_THREAD:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


def _is_numba_stream(stream):
    return isinstance(stream, _SimulatedStream) or type(stream).__module__.startswith("numba.")


def _handle(stream):
    """A stream's identity: its handle (0 for ``0`` or the default stream object); the simulator's
    own streams have none, so their ``id``. Reads ``stream.handle`` rather than ``int(stream)``,
    which numba-cuda's default stream answers with an enum (a DeprecationWarning)."""
    if isinstance(stream, numbers.Integral):
        return int(stream)
    handle = getattr(stream, "handle", None)
    if handle is None:
        return id(stream)  # the simulator's cuda.stream()
    handle = getattr(handle, "value", handle)  # a ctypes handle (numba without the NVIDIA bindings)
    return 0 if handle is None else int(handle)


def _stream_handle(stream):
    """The integer handle of a ``stream=`` argument (see :func:`as_stream`)."""
    if _is_numba_stream(stream):
        return _handle(stream)
    if hasattr(stream, "__cuda_stream__"):
        protocol = stream.__cuda_stream__
        handle = (protocol() if callable(protocol) else protocol)[1]
    elif hasattr(stream, "cuda_stream"):  # PyTorch
        handle = stream.cuda_stream
    elif hasattr(stream, "ptr"):  # CuPy
        handle = stream.ptr
    else:
        handle = stream
    if isinstance(handle, bool) or not isinstance(handle, numbers.Integral):
        raise TypeError(f"stream must be a CUDA stream: a Numba stream, an object with "
                        f"__cuda_stream__ (PyTorch's torch.cuda.current_stream(), CuPy's, "
                        f"cuda.core's), CuPy's .ptr or an integer handle, got "
                        f"{type(stream).__name__}")
    if handle < 0:
        raise ValueError(f"stream must be a CUDA stream handle (>= 0), got {handle}")
    return int(handle)


def as_stream(stream):
    """The Numba stream of a ``stream=`` argument: a Numba stream, an object with
    ``__cuda_stream__`` (a method or attribute giving ``(version, handle)``), an object with an
    integer ``cuda_stream`` (PyTorch's streams) or ``ptr`` (CuPy's), or an integer handle. ``0``
    (and Numba's default stream) stands for the default stream: the legacy one, or the per-thread
    one where numba.cuda is configured so. Made in the current GPU's context."""
    handle = _stream_handle(stream)
    if _is_numba_stream(stream) and handle not in (0, _LEGACY, _PER_THREAD):
        return stream
    return _stream(handle)


class _HostInterface:
    """A __cuda_array_interface__ read as NumPy's __array_interface__ (simulator only)."""

    def __init__(self, described, owner):
        self.__array_interface__ = dict(described, version=3)
        self.owner = owner  # the memory's owner lives as long as the view


def device_view(a, name="the array"):
    """A zero-copy Numba device array of a CUDA array (CuPy, PyTorch, Numba, ...), made in the
    context of the GPU that holds it. Its ``stream`` is the producer's stream of a version-3
    interface, which is not waited for here: the call orders its own stream after it. A stream
    key of 0, which the interface's specification forbids, is a ValueError naming ``name``."""
    if getattr(a, "__cuda_ndarray__", False) or not hasattr(a, "__cuda_array_interface__"):
        return a  # Numba's own device arrays (and the simulator's)
    described = a.__cuda_array_interface__
    if described.get("stream") == 0:
        raise ValueError(f"{name}'s __cuda_array_interface__ names stream 0, which the interface "
                         f"does not allow (1: the legacy default stream, 2: the per-thread one, "
                         f"None: no stream)")
    with _on_gpu(_pointer_gpu(described["data"][0])):
        if _SIMULATOR:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            host = np.asarray(_HostInterface({key: described.get(key) for key in
                                              ("shape", "typestr", "data", "strides")}, a))
            stream = described.get("stream")
            return FakeCUDAArray(host, stream=0 if stream is None else _stream(stream))
        return cuda.from_cuda_array_interface(described, owner=a, sync=False)


def _gpu_count():
    """GPUs that numba.cuda sees (one under the simulator)."""
    return 1 if _SIMULATOR else len(cuda.gpus)


@functools.cache
def _ordinal_query():
    """``pointer -> ordinal of the GPU that holds it``, on the installed numba.cuda's driver API:
    numba-cuda's (cuda.bindings), or the ctypes one of numba's own numba.cuda without the NVIDIA
    bindings. Resolving the names needs no GPU; calling the function does."""
    from numba.cuda.cudadrv import driver as module
    if getattr(module, "USE_NV_BINDING", True):
        binding = module.binding
        attribute = binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
        device_pointer = binding.CUdeviceptr

        def ordinal(pointer):
            return int(module.driver.cuPointerGetAttribute(attribute, device_pointer(pointer)))
        return ordinal
    from numba.cuda.cudadrv import enums
    attribute = enums.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL

    def ordinal_ctypes(pointer):
        value = ctypes.c_int()
        module.driver.cuPointerGetAttribute(ctypes.byref(value), attribute, pointer)
        return value.value
    return ordinal_ctypes


def _ordinal_of(pointer):
    """The driver's answer: the ordinal of the GPU that holds device memory at ``pointer``."""
    return _ordinal_query()(pointer)


def _pointer_gpu(pointer):
    """The ordinal of the GPU that holds device memory at ``pointer`` (None for a null pointer:
    an empty array). With a single GPU (or the simulator), 0 without asking the driver."""
    if not pointer:
        return None
    if _gpu_count() < 2:
        return 0
    return _ordinal_of(pointer)


def _current_gpu():
    current = cuda.gpus.current
    return None if current is None else current.id


def _on_gpu(gpu):
    """A context manager that makes ``gpu`` current (nothing when it is, or is None; nothing under
    the simulator, whose one GPU the tests give stand-in ordinals)."""
    if gpu is None or _SIMULATOR or gpu == _current_gpu():
        return contextlib.nullcontext()
    return cuda.gpus[gpu]


def choose_gpu(gpus):
    """The GPU a call runs on, from ``{argument name: ordinal of the GPU that holds it}`` (None:
    no memory to hold, an empty array); None when no argument lives on a GPU."""
    held = {name: gpu for name, gpu in gpus.items() if gpu is not None}
    if len(set(held.values())) > 1:
        where = ", ".join(f"{name} on GPU {gpu}" for name, gpu in held.items())
        raise ValueError(f"the CUDA arrays of one call must live on one GPU, got {where}; copy "
                         f"them to one device first")
    return next(iter(held.values()), None)


def _event():
    return cuda.event() if _SIMULATOR else cuda.event(timing=False)


def for_call(stream=None, **arrays):
    """The :class:`Steps` of one checked call: on the GPU that holds its CUDA arrays (device views,
    :func:`device_view`), on ``stream`` if given, else on the producer's stream of the first of
    them that names one (the stream a Numba array is bound to), else on the default stream. Every
    other producer's stream is waited for on the GPU (an event), not on the host, and waits in
    turn for the call's work when its results are handed back (:meth:`Steps.hand_back`). An
    unbound array, as an interface without a stream (PyTorch's), is ready: nothing to order.
    Raises ValueError for arrays on different GPUs."""
    arrays = {name: a for name, a in arrays.items() if a is not None and is_cuda_array(a)}
    gpu = choose_gpu({name: _pointer_gpu(interface(a)["data"][0]) for name, a in arrays.items()})
    with _on_gpu(gpu):
        producers = [a.stream for a in arrays.values() if _handle(getattr(a, "stream", 0))]
        if stream is None:
            stream = producers[0] if producers else 0
        own = as_stream(stream)
        others = {_handle(p): p for p in producers if _handle(p) != _handle(own)}
        for producer in others.values():
            event = _event()
            event.record(stream=producer)
            event.wait(stream=own)
    return Steps(own, None if gpu is None or gpu == _current_gpu() else gpu,
                 producers=list(others.values()))


# -- constants, scratch memory and launches -------------------------------------------------------


_constants = {}


def _context():
    """The current context, the key of what fastbn keeps on a GPU: a new one after
    ``cuda.close()`` finds nothing made in the old one (None under the simulator)."""
    return None if _SIMULATOR else cuda.current_context()


def _constant(value, channels):
    """A read-only float64 device vector of ``channels`` copies of ``value``, made once per
    context and size (the only copy that waits for the device, the first time)."""
    key = _context(), value, channels
    found = _constants.get(key)
    if found is None:
        found = _constants[key] = cuda.to_device(np.full(channels, value))
    return found


FEW_PIECES = 4  # per-piece parts of at most this many pieces are cut from a call's scratch


def _scratch_size(shape):
    """float64 values of one call's scratch, for an ``(outer, C, inner)`` view: a dozen vectors,
    and the per-piece parts (3 per piece) when there are few pieces."""
    pieces = _pieces(shape)[2]
    return ((3 * pieces if pieces <= FEW_PIECES else 0) + 12) * shape[1]


class _Scratch:
    """float64 device arrays cut from one allocation, sized for the call by ``expect``. The parts
    are never reused, so the ones a call returns (its statistics) stay valid; another allocation
    is made only if the estimate falls short."""

    def __init__(self):
        self._free = None
        self._size = 0

    def expect(self, size):
        self._size = size

    def take(self, shape):
        n = math.prod(shape) if isinstance(shape, tuple) else shape
        if self._free is None or self._free.size < n:
            self._free = cuda.device_array(max(n, self._size), np.float64)
            self._size = 0
        part, self._free = self._free[:n], self._free[n:]
        return part.reshape(shape)


_LOW_OCCUPANCY = r"Grid size \d+ will likely result in GPU under-utilization"
_REUSE_LAUNCHERS = not _SIMULATOR  # the simulator's kernel[...] is the kernel itself, reconfigured
_MAX_LAUNCHERS = 4096
_launchers = {}
_launchers_lock = threading.Lock()


def _launcher(kernel, grid, block, stream):
    """``kernel[grid, block, stream]``, configured once per kernel, grid, block and stream handle,
    and kept.

    numba.cuda warns of low occupancy when a launch is *configured* (every grid of fewer than 128
    blocks, which the per-channel kernels are by design), as ``NumbaPerformanceWarning`` of
    numba.core.errors or, in numba-cuda, of numba.cuda.core.errors: fastbn configures its launches
    once, under a filter of that message (any category), and reuses them, so its steady state
    never touches the warnings machinery (whose filters are process-wide, and whose every change
    resets the once-only registries of every module). A configuration holds no context: its
    kernel finds its code for the current one at each launch. The simulator reconfigures the kernel
    object itself and never warns, so there each launch is configured afresh.
    """
    if not _REUSE_LAUNCHERS:
        return kernel[grid, block, stream]
    key = kernel, grid, block, _handle(stream)
    found = _launchers.get(key)
    if found is None:
        with _launchers_lock:
            found = _launchers.get(key)
            if found is None:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", _LOW_OCCUPANCY, Warning)
                    found = kernel[grid, block, stream]
                if len(_launchers) >= _MAX_LAUNCHERS:
                    _launchers.clear()
                _launchers[key] = found
    return found


def _on_its_gpu(step):
    """A step of :class:`Steps` run with the call's GPU current."""

    @functools.wraps(step)
    def run(self, *args, **options):
        if self.gpu is None:
            return step(self, *args, **options)
        with cuda.gpus[self.gpu]:
            return step(self, *args, **options)
    return run


# -- the device interface: the same names, arguments and results in fastbn/cpu.py --------------


NAME = "cuda"


class _Output:
    """Where an op writes its result of x's shape (``array3``), and how it is handed back: on
    the device, bound to the call's stream, or copied to the host for NumPy input
    (``device="cuda"``)."""

    def __init__(self, steps, view, out, like):
        self._steps = steps
        self._on_host = isinstance(like, np.ndarray)
        self._out = out
        if out is not None and not self._on_host:
            self._device = device_view(out)
        else:
            self._device = cuda.device_array(like.shape, like.dtype)
        self.array3 = self._device.reshape(view.shape)

    def finish(self, *per_channel):
        """``(result, *per_channel)``, on the host (into ``out`` if given) for NumPy input."""
        steps = self._steps
        if not self._on_host:
            steps.hand_back()
            result = steps.bound(self._device) if self._out is None else self._out
            return (result, *map(steps.bound, per_channel))
        host = steps.to_host(self._device, *per_channel)
        if not per_channel:  # to_host gives a lone array as it is (dresidual's output)
            host = [host]
        if self._out is not None:
            self._out[...] = host[0]
            host[0] = self._out
        return tuple(host)


class _HostRunning:
    """Running statistics on the host for a call on the GPU: the batch's statistics come out on
    the call's stream, and fastbn.cpu updates them."""

    NAME = "cpu"
    update_running = staticmethod(cpu.update_running)

    def __init__(self, steps):
        self._steps = steps

    def per_channel(self, values, channels):
        if isinstance(values, np.ndarray):
            return values.astype(np.float64, copy=False)
        return self._steps.to_host(values)


class Steps:
    """The device interface for one call: every launch and copy on ``stream`` (a Numba stream;
    None: the default stream, resolved at each use), on GPU ``gpu`` (None: the current one), the
    float64 vectors from one scratch allocation (``scratch=False``: one allocation each);
    ``producers``: other streams that the call's inputs came from, which wait for the call's work
    when it hands its results back."""

    NAME = NAME

    def __init__(self, stream=None, gpu=None, scratch=True, producers=()):
        self._stream = stream
        self.gpu = gpu
        self._scratch = _Scratch() if scratch else None
        self._producers = list(producers)

    @property
    def stream(self):
        return _stream(0) if self._stream is None else self._stream

    def _take(self, shape):
        if self._scratch is None:
            return cuda.device_array(shape, np.float64)
        return self._scratch.take(shape)

    def _vectors(self, count, channels):
        return [self._take(channels) for _ in range(count)]

    def _parts(self, count, pieces, channels):
        """``count`` float64 ``(pieces, C)`` arrays for the reductions' per-piece results: cut from
        the scratch when there are few pieces, else from an allocation of their own that ends with
        the call, so that the statistics a call returns (parts of its scratch) never keep much
        more than themselves alive."""
        if pieces <= FEW_PIECES:
            return [self._take((pieces, channels)) for _ in range(count)]
        parts = cuda.device_array((count, pieces, channels), np.float64)
        return [parts[k] for k in range(count)]

    def _launch(self, kernel, grid, block, *args):
        _launcher(kernel, grid, block, self.stream)(*args)

    def bound(self, a):
        """``a`` bound to the call's stream, which its __cuda_array_interface__ then names."""
        return a.bind(self.stream)

    @_on_its_gpu
    def hand_back(self):
        """Order the producers' streams after the call's work so far (one event on the call's
        stream, which each waits for, on the GPU): a consumer there of what the call wrote (out,
        device running statistics, x in place), or a stream-ordered allocator reusing an input's
        memory, then sees the call done."""
        if self._producers:
            event = _event()
            event.record(stream=self.stream)
            for producer in self._producers:
                event.wait(stream=producer)

    def running_steps(self, running_mean):
        """Where the running statistics are updated: here, or on the host (NumPy arrays)."""
        return _HostRunning(self) if isinstance(running_mean, np.ndarray) else self

    def view(self, x, axis):
        """The ``(outer, C, inner)`` view of arrays laid out like ``x``, in C order (a CUDA array
        is C-contiguous; a NumPy one is copied in C-contiguous)."""
        view = ChannelView(x, axis, in_memory_order=False)
        if self._scratch is not None:
            self._scratch.expect(_scratch_size(view.shape))
        return view

    @_on_its_gpu
    def operands(self, view, *arrays):
        """The arrays as the kernels read them: device views, NumPy arrays copied in."""
        return [cuda.to_device(view.of(a), stream=self.stream) if isinstance(a, np.ndarray)
                else view.of(a) for a in arrays]

    @_on_its_gpu
    def output(self, view, out, like):
        """Where a result of ``like``'s shape goes: ``out`` (possibly ``like`` itself) or a new
        device array."""
        return _Output(self, view, out, like)

    @_on_its_gpu
    def per_channel(self, values, channels, fill=None, copy=False):
        """``(C,)`` values as a float64 device array; ``None`` gives ``fill`` everywhere (or None).

        A float64 device array is returned as it is unless ``copy``; others are converted on the
        device, NumPy arrays copied in on the call's stream, from a fresh pageable copy (a copy from
        pinned memory would read it after the call returns).
        """
        if values is None:
            return None if fill is None else _constant(float(fill), channels)
        target = self._take(channels)
        if isinstance(values, np.ndarray):
            target.copy_to_device(np.array(values, np.float64), stream=self.stream)
            return target
        values = device_view(values)
        if values.dtype == np.float64 and not copy:
            return values
        self._launch(_cast, *_grid(channels), values, target)
        return target

    @_on_its_gpu
    def to_host(self, a, *more):
        """``a`` copied to a NumPy array, once the call's work on it is done; with ``more``
        arrays, a list of copies."""
        stream = self.stream
        copies = [b.copy_to_host(stream=stream) for b in (a, *more)]
        stream.synchronize()
        return copies if more else copies[0]

    @_on_its_gpu
    def moments(self, x3):
        """Statistics: per-channel float64 ``(shift, delta, M2)`` of ``x3``, on the device.

        ``shift`` is one value of each channel (its first), ``delta`` the mean minus it, ``M2`` the
        sum of squared deviations from the mean.
        """
        outer, channels, _ = x3.shape
        if x3.size == 0:
            zeros = _constant(0.0, channels)
            return zeros, zeros, zeros
        shift, delta, m2 = self._vectors(3, channels)
        self._launch(_first_values, *_grid(channels), x3, shift)
        kernels, planar, piece, pieces, grid, block = _reduce_launch(x3)
        parts = self._parts(3, pieces, channels)
        if planar:
            self._launch(kernels[0], grid, block, x3, shift, piece, *parts)
        else:
            self._launch(kernels[1], grid, block, x3.reshape(outer, channels), shift, piece,
                         *parts)
        self._launch(_merge_moments, *_grid(channels), *parts, delta, m2)
        return shift, delta, m2

    def _affine_map(self, x3, y3, shift, scale, bias, residual3=None, relu=False):
        """``y = scale·(x − shift) + bias`` per channel, written into ``y3``; fused, in float64
        before the one rounding: ``+ residual3`` if given, then ReLU if ``relu``."""
        if x3.size == 0:
            return
        x, planar = _as_rows(x3)
        grid, block, per_row = _map_launch(x)
        y = _as_rows(y3)[0]
        if residual3 is None and not relu:
            self._launch(_affine, grid, block, y, x, x, x3.shape[1], planar, shift, scale, scale,
                         bias, per_row)
            return
        residual = x if residual3 is None else _as_rows(residual3)[0]  # x: a stand-in, unread
        self._launch(_fused_forward(residual3 is not None, bool(relu)), grid, block, y, y, x, x,
                     residual, x3.shape[1], planar, shift, scale, scale, bias, per_row)

    @_on_its_gpu
    def forward_map(self, x3, y3, shift, delta, m2, gamma, beta, eps, residual3=None,
                    relu=False):
        """Training forward's map from ``moments(x3)``, centred about the shift as on the CPU,
        fused with ``+ residual3`` and a ReLU if asked; returns the device
        ``(mean, biased var, invstd)``."""
        outer, channels, inner = x3.shape
        mean, var, invstd, scale, bias = self._vectors(5, channels)
        self._launch(_forward_maps, *_grid(channels), shift, delta, m2, float(outer * inner),
                     gamma, beta, eps, mean, var, invstd, scale, bias)
        self._affine_map(x3, y3, shift, scale, bias, residual3, relu)
        return mean, var, invstd

    @_on_its_gpu
    def normalize_with(self, x3, y3, mean, var, gamma, beta, eps, residual3=None, relu=False):
        """The map with given statistics (eval, ``fastbn.normalize``), fused as
        ``forward_map``'s; returns device ``invstd``."""
        channels = x3.shape[1]
        same_mean, same_var, invstd, scale, bias = self._vectors(5, channels)
        self._launch(_forward_maps, *_grid(channels), mean, _constant(0.0, channels), var, 1.0,
                     gamma, beta, eps, same_mean, same_var, invstd, scale, bias)
        self._affine_map(x3, y3, mean, scale, bias, residual3, relu)
        return invstd

    @_on_its_gpu
    def gradient_sums(self, dy3, x3, mean, y3=None):
        """Device ``(Σg, Σg·(x − mean))`` per channel, float64, in one pass over dy and x, where
        ``g`` is dy, or, given the ReLU's output ``y3``, dy where ``y3 > 0`` and 0 elsewhere."""
        outer, channels, _ = x3.shape
        if x3.size == 0:
            zeros = _constant(0.0, channels)
            return zeros, zeros
        kernels, planar, piece, pieces, grid, block = _reduce_launch(x3)
        parts = self._parts(2, pieces, channels)
        arrays = (dy3, x3) if y3 is None else (dy3, x3, y3)  # the masked kernels read y too
        kernel = kernels[(2 if planar else 3) + (0 if y3 is None else 2)]
        if not planar:
            arrays = [a.reshape(outer, channels) for a in arrays]
        self._launch(kernel, grid, block, *arrays, mean, piece, *parts)
        totals = self._vectors(2, channels)
        self._launch(_add_partials, *_grid(channels), *parts, *totals)
        return tuple(totals)

    @_on_its_gpu
    def backward_map(self, dy3, x3, dx3, mean, invstd, gamma, sum_dy, sum_dy_xmu, count,
                     training, y3=None, dresidual3=None):
        """``dx`` into ``dx3`` from the device sums over the batch of ``count`` values per channel
        that the statistics came from (x's own, or a larger batch that x is part of).

        With the ReLU's output ``y3``, dy is masked by ``y3 > 0`` first (as in ``gradient_sums``);
        the gradient so masked (dy, without ``y3``) goes into ``dresidual3`` too if given, which
        may be ``dy3`` itself.
        """
        channels = x3.shape[1]
        if x3.size == 0:
            return
        p, q, r = self._vectors(3, channels)
        self._launch(_backward_maps, *_grid(channels), sum_dy, sum_dy_xmu, float(count), gamma,
                     invstd, p, q, r)
        if y3 is not None or dresidual3 is not None:
            self._fused_backward_map(dy3, x3, dx3, mean, p, q, r, training, y3, dresidual3)
        elif training:
            x, planar = _as_rows(x3)
            grid, block, per_row = _map_launch(x)
            self._launch(_grad_map, grid, block, _as_rows(dx3)[0], _as_rows(dy3)[0], x, channels,
                         planar, mean, p, q, r, per_row)
        else:
            zeros = _constant(0.0, channels)
            self._affine_map(dy3, dx3, zeros, p, zeros)

    def _fused_backward_map(self, dy3, x3, dx3, mean, p, q, r, training, y3, dresidual3):
        """``backward_map``'s map fused with the ReLU's mask and the dresidual output."""
        dy, planar = _as_rows(dy3)
        grid, block, per_row = _map_launch(dy)
        dx = _as_rows(dx3)[0]
        if not training:  # eval's map is _scaled's, p·(g − 0) + 0, as in the plain backward
            zeros = _constant(0.0, x3.shape[1])
            mean, q, r = zeros, p, zeros
        # Stand-ins for the arrays not asked for, which the kernel built without them never reads.
        mask = dy if y3 is None else _as_rows(y3)[0]
        dresidual = dx if dresidual3 is None else _as_rows(dresidual3)[0]
        self._launch(_fused_backward(bool(training), y3 is not None, dresidual3 is not None),
                     grid, block, dx, dresidual, dy, _as_rows(x3)[0], mask, x3.shape[1], planar,
                     mean, p, q, r, per_row)

    @_on_its_gpu
    def parameter_gradients(self, sum_dy, sum_dy_xmu, invstd, dtype):
        """Device ``(dgamma, dbeta) = (Σdy·x̂, Σdy)`` in ``dtype`` (rows of one allocation)."""
        both = cuda.device_array((2, sum_dy.size), dtype)
        self._launch(_parameter_gradients, *_grid(sum_dy.size), sum_dy, sum_dy_xmu, invstd,
                     both[0], both[1])
        return both[0], both[1]

    @_on_its_gpu
    def cast(self, a, dtype):
        """A float64 device vector in ``dtype`` (itself when that is float64)."""
        if np.dtype(dtype) == np.float64:
            return a
        target = cuda.device_array(a.shape, dtype)
        if a.size:
            self._launch(_cast, *_grid(a.size), a, target)
        return target

    @_on_its_gpu
    def update_running(self, running_mean, running_var, mean, var, momentum, unbias):
        """PyTorch's update, in place on the device, in the running arrays' dtype:
        ``running = (1 − momentum)·running + momentum·batch``, with the unbiased ``var·unbias``."""
        self._launch(_update_running, *_grid(mean.size), device_view(running_mean),
                     device_view(running_var), mean, var, momentum, unbias)

    # -- the normalization family (docs/design.md §2.5): per-row statistics of a (R, P, S) view --

    def _filled(self, count, size, fill):
        """``count`` float64 ``(size,)`` vectors of ``fill`` (the results of empty views)."""
        vectors = self._vectors(count, size)
        for v in vectors if size else ():
            v.copy_to_device(np.full(size, fill), stream=self.stream)
        return vectors

    def _group_launch_map(self, kernel, out3, a3, b3, u, v, z, e, gamma, beta, groups):
        out, planar = _group_rows(out3)
        grid, block, per_row = _map_launch(out)
        self._launch(kernel, grid, block, out, _group_rows(a3)[0], _group_rows(b3)[0], u, v, z, e,
                     gamma, beta, out3.shape[1], groups, planar, per_row)

    @_on_its_gpu
    def group_forward(self, x3, y3, groups, gamma, beta, eps, centred):
        """Per-row statistics of ``x3`` (R, P, S) and the map into ``y3``: device float64
        ``(mean, var, invstd)`` of shape (R,), ``mean`` None for RMS norm (``centred`` False).

        ``centred``: ``var`` is the biased variance, exact (moments of ``x − s`` about the row's
        first value s), and ``y = a·(x − s) + (β − a·δ)``, ``a = γ·invstd``, δ = mean − s, so a
        constant row gives exactly β. Otherwise ``var`` is the mean square, ``y = (γ·invstd)·x``.
        ``gamma``, ``beta``: float64 device vectors of groups·P parameters.
        """
        rows, runs, inner = x3.shape
        length = runs * inner
        if rows == 0 or length == 0:
            mean, var, invstd = self._filled(3, rows, np.nan)
            return (mean if centred else None), var, invstd
        x = x3.reshape(rows, length)
        blocks, width = _band_launch(rows, length)
        kernels = _group_kernels(THREADS, TILE)
        if centred:
            shift, delta, mean, var, invstd = self._vectors(5, rows)
            self._launch(kernels[0], blocks, THREADS, x, width, float(eps), shift, delta, mean,
                         var, invstd)
            self._group_launch_map(_group_centred_map, y3, x3, x3, invstd, shift, delta, delta,
                                   gamma, beta, groups)
            return mean, var, invstd
        var, invstd = self._vectors(2, rows)
        self._launch(kernels[1], blocks, THREADS, x, width, float(eps), var, invstd)
        self._group_launch_map(_group_scaled_map, y3, x3, x3, invstd, invstd, invstd, invstd,
                               gamma, beta, groups)
        return None, var, invstd

    @_on_its_gpu
    def group_normalize_with(self, x3, y3, groups, mean, invstd, gamma, beta):
        """The map with given per-row statistics (device float64 (R,) vectors):
        ``y = (γ·invstd)·(x − mean) + β``."""
        if x3.size == 0:
            return
        self._group_launch_map(_group_with_map, y3, x3, x3, invstd, mean, mean, mean, gamma,
                               beta, groups)

    @_on_its_gpu
    def group_backward(self, dy3, x3, dx3, groups, mean, invstd, gamma, training):
        """``dx`` into ``dx3`` (if not None), and device float64 ``(dgamma, dbeta) =
        (Σdy·x̂, Σdy)`` per parameter (groups·P), x̂ = (x − mean)·invstd (x·invstd when ``mean``
        is None, RMS norm).

        ``training``: ``dx = (γ·invstd)·dy + (q·(x − μ) + r0)`` with ``q = −invstd³·B/L``,
        ``r0 = −invstd·A/L``, ``A = Σγ·dy``, ``B = Σγ·dy·(x − μ)`` per row (μ and r0 0 for RMS
        norm); otherwise ``dx = (γ·invstd)·dy``. Every sum in float64, in a fixed order.
        """
        rows, runs, inner = x3.shape
        length = runs * inner
        parameters = groups * runs
        centred = mean is not None
        if not centred:
            mean = invstd  # a stand-in, never read
        if x3.size == 0:
            return tuple(self._filled(2, parameters, 0.0))
        kernels = _group_kernels(THREADS, TILE)
        dgamma, dbeta = self._vectors(2, parameters)
        q, r0 = self._vectors(2, rows) if training else (invstd, invstd)
        if inner > 1:  # a parameter per run: sums per run, then per row and per parameter
            sums = self._parts(2, rows // groups, parameters)
            flat = [s.reshape(rows * runs) for s in sums]
            blocks, width = _band_launch(rows * runs, inner)
            self._launch(kernels[3], blocks, THREADS, dy3.reshape(rows * runs, inner),
                         x3.reshape(rows * runs, inner), mean, runs, centred, width, *flat)
            if training:
                self._launch(_run_gradient_terms, *_grid(rows), *flat, gamma, invstd, groups,
                             runs, float(length), centred, q, r0)
            self._launch(_run_parameter_gradients, *_grid(parameters), *flat, invstd, groups,
                         runs, dgamma, dbeta)
        else:  # a parameter per value: sums per row, and per parameter down the columns
            dy, x = dy3.reshape(rows, runs), x3.reshape(rows, runs)
            if training:
                blocks, width = _band_launch(rows, runs)
                self._launch(kernels[2], blocks, THREADS, dy, x, gamma, mean, invstd, groups,
                             centred, width, q, r0)
            outer = rows // groups
            segment = max(SEGMENT, -(-outer // MAX_GRID_Y))
            pieces = -(-outer // segment)
            parts = self._parts(2, pieces, parameters)
            self._launch(_column_parameter_gradients, (_grid(parameters)[0], pieces), THREADS,
                         dy.reshape(outer, parameters), x.reshape(outer, parameters), mean,
                         invstd, groups, runs, centred, segment, *parts)
            self._launch(_add_partials, *_grid(parameters), *parts, dgamma, dbeta)
        if dx3 is not None:
            if not training:
                kernel = _group_scaled_map
            else:
                kernel = _group_gradient_map if centred else _group_rms_gradient_map
            self._group_launch_map(kernel, dx3, dy3, x3, invstd, q, mean, r0, gamma, gamma,
                                   groups)
        return dgamma, dbeta


# The module's own steps: the default stream of the current GPU, an allocation per vector.
_default = Steps(scratch=False)
view = _default.view
operands = _default.operands
output = _default.output
per_channel = _default.per_channel
to_host = _default.to_host
moments = _default.moments
forward_map = _default.forward_map
normalize_with = _default.normalize_with
gradient_sums = _default.gradient_sums
backward_map = _default.backward_map
parameter_gradients = _default.parameter_gradients
update_running = _default.update_running
cast = _default.cast
group_forward = _default.group_forward
group_normalize_with = _default.group_normalize_with
group_backward = _default.group_backward


def available():
    """Whether numba.cuda finds a usable GPU."""
    try:
        return cuda.is_available()
    except Exception:  # a broken driver or runtime counts as none
        return False
