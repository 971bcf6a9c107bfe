"""What one value of the affine map costs in cache: float64 arithmetic, float32, and a copy.

    python bench/arithmetic.py

A single-threaded Numba loop over float32 rows that sit in L1, repeated: the arithmetic cost that
bounds fastbn on tensors that fit in cache (see README.md, "Where the time goes").
"""
import time

import numpy as np
from numba import njit


@njit(fastmath={"contract"})
def _map64(x, y, a, s, b, repeats):
    for _ in range(repeats):
        for r in range(x.shape[0]):
            xr, yr = x[r], y[r]
            for k in range(xr.size):
                yr[k] = a[k] * (xr[k] - s[k]) + b[k]  # float64 a, s, b: float64 arithmetic


@njit(fastmath={"contract"})
def _map32(x, y, a, b, repeats):
    for _ in range(repeats):
        for r in range(x.shape[0]):
            xr, yr = x[r], y[r]
            for k in range(xr.size):
                yr[k] = a[k] * xr[k] + b[k]  # float32 a, b: float32 arithmetic, folded


@njit
def _copy(x, y, repeats):
    for _ in range(repeats):
        for r in range(x.shape[0]):
            xr, yr = x[r], y[r]
            for k in range(xr.size):
                yr[k] = xr[k]


def main(repeats=2000):
    rng = np.random.default_rng(0)
    x = rng.random((8, 1024), dtype=np.float32)  # 32 KB in, 32 KB out: L1 and L2
    y = np.empty_like(x)
    a, s, b = rng.random((3, 1024))
    loops = {
        "float64 map a·(x − s) + b": lambda n: _map64(x, y, a, s, b, n),
        "float32 map a·x + b": lambda n: _map32(x, y, a.astype(np.float32), b.astype(np.float32), n),
        "copy": lambda n: _copy(x, y, n),
    }
    for name, loop in loops.items():
        loop(1)  # compile
        best = min(_timed(loop, repeats) for _ in range(5))
        print(f"{name:28s} {best / (x.size * repeats) * 1e9:.3f} ns per value")


def _timed(loop, repeats):
    start = time.perf_counter()
    loop(repeats)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
