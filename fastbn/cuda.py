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
training forward map ``forward_map(x3, y3, s, δ, M2, γ, β, eps)``           ``(μ, σ², invstd)``
map with statistics  ``normalize_with(x3, y3, μ, σ², γ, β, eps)``           ``invstd``
(eval, normalize)
gradient sums        ``gradient_sums(dy3, x3, μ)``                          ``(Σdy, Σdy·(x−μ))``
backward map         ``backward_map(dy3, x3, dx3, μ, invstd, γ, Σdy,        –
                     Σdy·(x−μ), count, training)``
parameter gradients  ``parameter_gradients(Σdy, Σdy·(x−μ), invstd, dtype)`` ``(dγ, dβ)``
running statistics   ``update_running(running_mean, running_var, μ, σ²,     –
                     momentum, unbias)``
==================== ====================================================== =================

The view is C-contiguous here (CUDA arrays must be; NumPy arrays are copied in so):

* reductions come in two layouts: *planar* (``inner > 1``) gives a block one chunk of one channel,
  whose threads read consecutive values of a run; *rows* (``inner == 1``: N×D, channels-last)
  gives a block a segment of rows and ``COLUMNS`` consecutive channels, so a warp reads along a
  row. Either way reads are coalesced;
* maps read the view as rows, threads along a row and blocks down the rows.

Numerics as on the CPU (docs/design.md §3): float64 arithmetic, statistics of ``x − s`` with ``s``
one value of the channel; each thread keeps a Welford accumulator, a block merges its threads' with
Chan et al.'s formula (fastbn.cpu.chan, compiled for the device) in shared memory in a fixed tree
order, and a second small kernel merges the blocks' in block order. No floating-point atomics, so
results are deterministic. Indices are 64-bit, so tensors of more than 2**31 values work.

The block sizes are read at call time (kernels are built per size), so tests can shrink them to run
the multi-block merges on small shapes.
"""
import functools
import math

import numpy as np
from numba import cuda, float64, int64

from . import cpu
from ._arrays import device_view
from ._layout import ChannelView

THREADS = 256  # threads per block, a power of two
COLUMNS = 32  # rows kernels: channels a block covers (one warp reads 32 consecutive values)
CHUNK = 1 << 15  # planar: values of one channel a block reduces (more when a channel is huge)
SEGMENT = 1 << 10  # rows: rows a block reduces (more when there are very many rows)
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y, which counts the pieces of a channel

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


@cuda.jit(device=True)
def _welford(n, mean, m2, d):
    n += 1.0
    delta = d - mean
    mean += delta / n
    return n, mean, m2 + delta * (d - mean)


@functools.lru_cache(maxsize=None)
def _kernels(threads, columns):
    """The kernels for blocks of ``threads`` threads (rows kernels: ``columns`` × the rest)."""
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
        """``(c, j, t, k, stop, o, i)``: a planar block's channel and chunk, the thread, its first
        value ``k`` of the channel (run ``o``, place ``i``) and the chunk's end."""
        c = cuda.blockIdx.x
        j = int64(cuda.blockIdx.y)
        t = cuda.threadIdx.x
        inner = x.shape[2]
        start = j * chunk
        k = start + t
        o = k // inner
        return c, j, t, k, min(start + chunk, int64(x.shape[0]) * inner), o, k - o * inner

    @cuda.jit(device=True)
    def planar_next(k, o, i, inner):
        """The thread's next value, a block further on: the run and place stepped without a
        division."""
        i += threads
        while i >= inner:
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
        c, j, t, k, stop, o, i = planar_place(x, chunk)
        s = shift[c]
        n = mean = m2 = 0.0
        while k < stop:
            n, mean, m2 = _welford(n, mean, m2, float64(x[o, c, i]) - s)
            k, o, i = planar_next(k, o, i, x.shape[2])
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
        n = mean = m2 = 0.0
        if c < channels:
            s = shift[c]
            while r < stop:
                n, mean, m2 = _welford(n, mean, m2, float64(x[r, c]) - s)
                r += lanes
        sn = cuda.shared.array(threads, float64)
        smean = cuda.shared.array(threads, float64)
        sm2 = cuda.shared.array(threads, float64)
        n, mean, m2 = merge_moments(n, mean, m2, sn, smean, sm2, t, columns)
        if ty == 0 and c < channels:
            counts[g, c], means[g, c], m2s[g, c] = n, mean, m2

    @cuda.jit
    def planar_grad_sums(dy, x, mean, chunk, sums_dy, sums_dy_xmu):
        c, j, t, k, stop, o, i = planar_place(x, chunk)
        m = mean[c]
        a = b = 0.0
        while k < stop:
            g = float64(dy[o, c, i])
            a += g
            b += g * (float64(x[o, c, i]) - m)
            k, o, i = planar_next(k, o, i, x.shape[2])
        sa = cuda.shared.array(threads, float64)
        sb = cuda.shared.array(threads, float64)
        a, b = add_sums(a, b, sa, sb, t, 1)
        if t == 0:
            sums_dy[j, c], sums_dy_xmu[j, c] = a, b

    @cuda.jit
    def rows_grad_sums(dy, x, mean, segment, sums_dy, sums_dy_xmu):
        tx, ty, t, c, g, r, stop = rows_place(x, segment)
        channels = x.shape[1]
        a = b = 0.0
        if c < channels:
            m = mean[c]
            while r < stop:
                v = float64(dy[r, c])
                a += v
                b += v * (float64(x[r, c]) - m)
                r += lanes
        sa = cuda.shared.array(threads, float64)
        sb = cuda.shared.array(threads, float64)
        a, b = add_sums(a, b, sa, sb, t, columns)
        if ty == 0 and c < channels:
            sums_dy[g, c], sums_dy_xmu[g, c] = a, b

    return planar_moments, rows_moments, planar_grad_sums, rows_grad_sums


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
def _forward_maps(delta, m2, count, gamma, beta, eps, invstd, scale, bias):
    c = cuda.grid(1)
    if c < delta.size:
        invstd[c], scale[c], bias[c] = _forward_coefficients(m2[c], count, gamma[c], beta[c],
                                                             delta[c], eps)


@cuda.jit
def _backward_maps(sum_dy, sum_dy_xmu, count, gamma, invstd, p, q, r):
    c = cuda.grid(1)
    if c < p.size:
        p[c], q[c], r[c] = _backward_coefficients(sum_dy[c], sum_dy_xmu[c], count, gamma[c],
                                                  invstd[c])


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
def _mean_and_var(shift, delta, m2, count, mean, var):
    c = cuda.grid(1)
    if c < mean.size:
        mean[c] = shift[c] + delta[c]
        var[c] = m2[c] / count


@cuda.jit
def _cast(source, target):
    """``target[:] = source`` in target's dtype (per-channel vectors)."""
    c = cuda.grid(1)
    if c < target.size:
        target[c] = source[c]


@cuda.jit
def _product(a, b, out):
    c = cuda.grid(1)
    if c < out.size:
        out[c] = a[c] * b[c]


# -- elementwise maps, over the view as rows ----------------------------------------------------
#
# The maps see the view as a 2-D array: ``(outer·C, inner)`` rows of one channel each (planar) or
# ``(outer, C)`` rows of every channel (rows). Threads run along a row (coalesced), blocks down the
# rows, so the channel of a value costs one integer modulo per row, not a division per value.


def _row_map(value):
    """A kernel ``(out, a, b, channels, planar, centre, p, q, r)`` that writes
    ``out = value(a, b, ...)`` over the view read as rows: a grid-stride loop along and down."""

    @cuda.jit
    def kernel(out, a, b, channels, planar, centre, p, q, r):
        rows, width = out.shape
        first = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        step = int64(cuda.gridDim.x) * cuda.blockDim.x
        row = int64(cuda.blockIdx.y)
        while row < rows:
            row_channel = row % channels
            w = first
            while w < width:
                c = row_channel if planar else w
                out[row, w] = value(a, b, row, w, c, centre, p, q, r)
                w += step
            row += cuda.gridDim.y

    return kernel


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


def _as_rows(a3):
    """``(rows, planar)``: the view as the maps read it."""
    outer, channels, inner = a3.shape
    if inner > 1:
        return a3.reshape(outer * channels, inner), True
    return a3.reshape(outer, channels), False


def _map_launch(rows):
    height, width = rows.shape
    return (max(1, min(-(-width // THREADS), 1024)), max(1, min(height, MAX_GRID_Y))), THREADS


# -- launching the kernels ----------------------------------------------------------------------


def _grid(n):
    """Launch configuration of a per-channel kernel: a thread per channel."""
    return max(1, -(-n // THREADS)), THREADS


def _pieces(x3):
    """``(planar, piece, pieces)``: how the reductions cut each channel."""
    outer, channels, inner = x3.shape
    if inner > 1:
        total = outer * inner
        chunk = max(CHUNK, -(-total // MAX_GRID_Y))
        return True, chunk, -(-total // chunk)
    segment = max(SEGMENT, -(-outer // MAX_GRID_Y))
    return False, segment, -(-outer // segment)


def _reduce_launch(x3):
    planar, piece, pieces = _pieces(x3)
    channels = x3.shape[1]
    kernels = _kernels(THREADS, min(COLUMNS, THREADS))
    if planar:
        return kernels, planar, piece, pieces, (channels, pieces), THREADS
    columns = min(COLUMNS, THREADS)
    return kernels, planar, piece, pieces, (-(-channels // columns), pieces), \
        (columns, THREADS // columns)


def _zeros(channels):
    return cuda.to_device(np.zeros(channels))


def _empty(shape, count):
    """``count`` new float64 device arrays of ``shape`` (per-channel vectors, per-piece parts)."""
    return [cuda.device_array(shape, np.float64) for _ in range(count)]


def _shift(x3):
    """One value of each channel (its first), float64: statistics are taken of x minus it."""
    shift = cuda.device_array(x3.shape[1], np.float64)
    _first_values[_grid(x3.shape[1])](x3, shift)
    return shift


def _affine_map(x3, y3, shift, scale, bias):
    """``y = scale·(x − shift) + bias`` per channel, written into ``y3``."""
    if x3.size == 0:
        return
    x, planar = _as_rows(x3)
    _affine[_map_launch(x)](_as_rows(y3)[0], x, x, x3.shape[1], planar, shift, scale, scale,
                            bias)


# -- the device interface: the same names, arguments and results in fastbn/cpu.py --------------


NAME = "cuda"


def view(x, axis):
    """The ``(outer, C, inner)`` view of arrays laid out like ``x``, in C order (a CUDA array is
    C-contiguous; a NumPy one is copied in C-contiguous)."""
    return ChannelView(x, axis, in_memory_order=False)


def operands(view, *arrays):
    """The arrays as the kernels read them: device views, NumPy arrays copied in."""
    return [cuda.to_device(view.of(a)) if isinstance(a, np.ndarray) else view.of(a)
            for a in arrays]


class _Output:
    """Where an op writes its result of x's shape (``array3``), and how it is handed back: on
    the device, or copied to the host for NumPy input (``device="cuda"``)."""

    def __init__(self, view, out, like):
        self._on_host = isinstance(like, np.ndarray)
        self._out = out
        if out is not None and not self._on_host:
            self._device = device_view(out)
        else:
            self._device = cuda.device_array(like.shape, like.dtype)
        self.array3 = self._device.reshape(view.shape)

    def finish(self, *per_channel):
        """``(result, *per_channel)``, on the host (into ``out`` if given) for NumPy input."""
        if not self._on_host:
            return (self._device if self._out is None else self._out, *per_channel)
        host = self._device.copy_to_host()
        if self._out is not None:
            self._out[...] = host
            host = self._out
        return (host, *(a.copy_to_host() for a in per_channel))


def output(view, out, like):
    """Where a result of ``like``'s shape goes: ``out`` (possibly ``like`` itself) or a new
    device array."""
    return _Output(view, out, like)


def per_channel(values, channels, fill=None, copy=False):
    """``(C,)`` values as a float64 device array; ``None`` gives ``fill`` everywhere (or None).

    A float64 device array is returned as it is unless ``copy``; others are converted on the
    device, NumPy arrays copied in.
    """
    if values is None:
        return None if fill is None else cuda.to_device(np.full(channels, fill, np.float64))
    if isinstance(values, np.ndarray):
        return cuda.to_device(np.asarray(values, np.float64))
    values = device_view(values)
    if values.dtype == np.float64 and not copy:
        return values
    target = cuda.device_array(channels, np.float64)
    _cast[_grid(channels)](values, target)
    return target


def to_host(a):
    """``a`` copied to a NumPy array."""
    return a.copy_to_host()


def moments(x3):
    """Statistics: per-channel float64 ``(shift, delta, M2)`` of ``x3``, on the device.

    ``shift`` is one value of each channel (its first), ``delta`` the mean minus it, ``M2`` the
    sum of squared deviations from the mean.
    """
    outer, channels, inner = x3.shape
    if x3.size == 0:
        return _zeros(channels), _zeros(channels), _zeros(channels)
    shift = _shift(x3)
    kernels, planar, piece, pieces, grid, block = _reduce_launch(x3)
    counts, means, m2s = _empty((pieces, channels), 3)
    if planar:
        kernels[0][grid, block](x3, shift, piece, counts, means, m2s)
    else:
        kernels[1][grid, block](x3.reshape(outer, channels), shift, piece, counts, means, m2s)
    delta, m2 = _empty(channels, 2)
    _merge_moments[_grid(channels)](counts, means, m2s, delta, m2)
    return shift, delta, m2


def forward_map(x3, y3, shift, delta, m2, gamma, beta, eps):
    """Training forward's map from ``moments(x3)``, centred about the shift as on the CPU;
    returns the device ``(mean, biased var, invstd)``."""
    outer, channels, inner = x3.shape
    count = float(outer * inner)
    launch = _grid(channels)
    mean, var, invstd, scale, bias = _empty(channels, 5)
    _mean_and_var[launch](shift, delta, m2, count, mean, var)
    _forward_maps[launch](delta, m2, count, gamma, beta, eps, invstd, scale, bias)
    _affine_map(x3, y3, shift, scale, bias)
    return mean, var, invstd


def normalize_with(x3, y3, mean, var, gamma, beta, eps):
    """The map with given statistics (eval, ``fastbn.normalize``); returns device ``invstd``."""
    channels = x3.shape[1]
    invstd, scale, bias = _empty(channels, 3)
    _forward_maps[_grid(channels)](_zeros(channels), var, 1.0, gamma, beta, eps, invstd, scale,
                                   bias)
    _affine_map(x3, y3, mean, scale, bias)
    return invstd


def gradient_sums(dy3, x3, mean):
    """Device ``(Σdy, Σdy·(x − mean))`` per channel, float64, in one pass over dy and x."""
    outer, channels, inner = x3.shape
    if x3.size == 0:
        return _zeros(channels), _zeros(channels)
    kernels, planar, piece, pieces, grid, block = _reduce_launch(x3)
    parts = _empty((pieces, channels), 2)
    if planar:
        kernels[2][grid, block](dy3, x3, mean, piece, *parts)
    else:
        flat = (outer, channels)
        kernels[3][grid, block](dy3.reshape(flat), x3.reshape(flat), mean, piece, *parts)
    totals = _empty(channels, 2)
    _add_partials[_grid(channels)](*parts, *totals)
    return tuple(totals)


def backward_map(dy3, x3, dx3, mean, invstd, gamma, sum_dy, sum_dy_xmu, count, training):
    """``dx`` into ``dx3`` from the device sums over the batch of ``count`` values per channel
    that the statistics came from (x's own, or a larger batch that x is part of)."""
    channels = x3.shape[1]
    if x3.size == 0:
        return
    p, q, r = _empty(channels, 3)
    _backward_maps[_grid(channels)](sum_dy, sum_dy_xmu, float(count), gamma, invstd, p, q, r)
    if training:
        x, planar = _as_rows(x3)
        _grad_map[_map_launch(x)](_as_rows(dx3)[0], _as_rows(dy3)[0], x, channels, planar, mean,
                                  p, q, r)
    else:
        zeros = _zeros(channels)
        _affine_map(dy3, dx3, zeros, p, zeros)


def parameter_gradients(sum_dy, sum_dy_xmu, invstd, dtype):
    """Device ``(dgamma, dbeta) = (Σdy·x̂, Σdy)`` in ``dtype``."""
    dgamma = cuda.device_array(sum_dy.size, dtype)
    _product[_grid(sum_dy.size)](sum_dy_xmu, invstd, dgamma)
    dbeta = cuda.device_array(sum_dy.size, dtype)
    _cast[_grid(sum_dy.size)](sum_dy, dbeta)
    return dgamma, dbeta


def update_running(running_mean, running_var, mean, var, momentum, unbias):
    """PyTorch's update, in place on the device, in the running arrays' dtype:
    ``running = (1 − momentum)·running + momentum·batch``, with the unbiased ``var·unbias``."""
    _update_running[_grid(mean.size)](device_view(running_mean), device_view(running_var), mean,
                                      var, momentum, unbias)


def available():
    """Whether numba.cuda finds a usable GPU."""
    try:
        return cuda.is_available()
    except Exception:  # a broken driver or runtime counts as none
        return False
