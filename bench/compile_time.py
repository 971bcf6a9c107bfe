"""Cold and warm start of fastbn: what a user waits for before the first result.

    python bench/compile_time.py [--dtype float32|float64]

Each measurement runs in a fresh interpreter with its own Numba cache directory:

* cold: an empty cache, so the first calls compile every CPU kernel of the dtype (all ops, both
  kernel families), and the total is the time from ``import fastbn`` to the last result;
* warm: the same again with the cache the cold run filled: import plus first calls, loading the
  kernels from disk.
"""
import argparse
import os
import subprocess
import sys
import tempfile

# Every op on both kernel families: planar (N×C×L with long runs) and rows (N×D, channels-last).
FIRST_CALLS = r"""
import time
start = time.perf_counter()
import numpy as np
import fastbn
dtype = np.dtype(DTYPE)
for shape, axis in (((4, 3, 40), 1), ((40, 100), 1), ((4, 5, 6, 3), -1)):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    c = shape[axis]
    y, stats = fastbn.forward(x, axis=axis)
    fastbn.backward(x, x, stats, axis=axis)
    fastbn.forward(x, axis=axis, training=False, running_mean=np.zeros(c), running_var=np.ones(c))
    fastbn.backward(x, x, stats, axis=axis, training=False)
print(f"{time.perf_counter() - start:.2f}")
"""


def first_calls(dtype, cache_dir):
    """Seconds from ``import fastbn`` to the last first call, in a new interpreter."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    script = FIRST_CALLS.replace("DTYPE", repr(dtype))
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = first_calls(args.dtype, cache_dir)
        warm = first_calls(args.dtype, cache_dir)
    print(f"{args.dtype}: cold start (empty Numba cache, compiles every CPU kernel) {cold:.1f} s; "
          f"warm start (import + first calls, kernels from the cache) {warm:.2f} s")


if __name__ == "__main__":
    main()
