"""New results of calls without ``out=``: large ones reuse memory whose earlier results are gone.

A new array's pages are mapped by the kernel only when they are first written, and it zeroes each
one: for a 205 MB output that is about 40 ms here, more than batch norm itself takes. So results of
``MIN_BYTES`` (32 MB) or more are views of buffers that fastbn keeps: a buffer that no array refers to any
more (its last result, and every view of it, has been dropped) is handed out again, its pages
already mapped. Buffers nobody uses are kept up to ``FASTBN_OUTPUT_CACHE`` bytes in all (the
environment variable, read at import; default 1 GiB; 0 turns the cache off), checked whenever a
result is made, the least recently used dropped first; ``release()`` drops them all.

A result from the cache is an ordinary C-contiguous array whose ``base`` is the buffer (so
``flags.owndata`` is False); the buffer stays in use for as long as the result or any view of it
lives.
"""
import math
import os
import sys
import threading

import numpy as np

# Smaller arrays come from malloc's free memory, their pages already mapped: glibc maps each
# allocation of more than its mmap threshold afresh, a threshold that grows with the blocks freed
# up to 32 MB on 64-bit Linux. Measured here: below 32 MB a new result costs what out= does (the
# cache only added its bookkeeping), above it 2.3x (38.5 MB) to 1.5x (64 MB) more.
MIN_BYTES = 32 << 20


def _limit(value):
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable FASTBN_OUTPUT_CACHE must be a number of "
                         f"bytes (0 turns the output cache off), got {value!r}") from None


LIMIT = _limit(os.environ.get("FASTBN_OUTPUT_CACHE", str(1 << 30)))  # idle bytes kept, at most

_buffers = []  # every buffer handed out and not yet dropped, least recently used first
_lock = threading.Lock()


def _count(buffers, k):
    """The references to ``buffers[k]`` (the list's, and the argument's while it is counted)."""
    return sys.getrefcount(buffers[k])


_IDLE_REFERENCES = _count([np.empty(1, np.uint8)], 0)  # a buffer only its list refers to


def _idle(k):
    """Whether no array refers to ``_buffers[k]`` any more."""
    return _count(_buffers, k) <= _IDLE_REFERENCES


def _reset_after_fork():
    global _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_reset_after_fork)


def empty(shape, dtype):
    """A new C-contiguous array of ``shape`` and ``dtype``, its contents undefined (as
    ``np.empty``): a view of an idle cached buffer of its size where there is one."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or LIMIT <= 0:
        return np.empty(shape, dtype)
    with _lock:
        buffer = _take(nbytes)
        if buffer is None:
            buffer = np.empty(nbytes, np.uint8)
        _buffers.append(buffer)  # the most recently used, at the end
        _trim()
    return buffer.view(dtype).reshape(shape)


def _take(nbytes):
    """An idle buffer of ``nbytes`` taken out of the list, or None."""
    for k in range(len(_buffers)):
        if _buffers[k].size == nbytes and _idle(k):
            return _buffers.pop(k)
    return None


def _trim():
    """Drop the least recently used idle buffers beyond LIMIT idle bytes."""
    idle = [_idle(k) for k in range(len(_buffers))]
    excess = sum(b.size for b, i in zip(_buffers, idle) if i) - LIMIT
    kept = []
    for buffer, is_idle in zip(_buffers, idle):
        if is_idle and excess > 0:
            excess -= buffer.size
        else:
            kept.append(buffer)
    _buffers[:] = kept


def release():
    """Drop every idle cached buffer (buffers in use are dropped when their results are)."""
    with _lock:
        _buffers[:] = [_buffers[k] for k in range(len(_buffers)) if not _idle(k)]


def cached_bytes():
    """``(in_use, idle)``: the bytes of the cached buffers that results still use, and of those
    kept for reuse."""
    with _lock:
        idle = [_idle(k) for k in range(len(_buffers))]
        sizes = [buffer.size for buffer in _buffers]
    return (sum(n for n, i in zip(sizes, idle) if not i), sum(n for n, i in zip(sizes, idle) if i))
