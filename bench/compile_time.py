"""Cold and warm start of fastbn: what a user waits for before the first result.

    python bench/compile_time.py [--dtype float32|float64]

Each measurement runs in a fresh interpreter with its own Numba cache directory:

* cold: an empty cache, so the first calls compile every CPU step and kernel of the dtype (all
  ops, both kernel families): first on small tensors, which run the serial builds (what a NumPy
  trainer with small layers waits for), then on tensors of at least ``PARALLEL_MIN`` values,
  which add the parallel builds; each total is the time from ``import fastbn`` to the last
  result;
* warm: the same again with the cache the cold run filled: import plus first calls, loading the
  compiled code from disk.
"""
import argparse
import os
import subprocess
import sys
import tempfile

# Every op on both kernel families: planar (N×C×L with long runs) and rows (N×D, channels-last),
# on small tensors (serial builds), then on tensors of 262,144 values (parallel builds).
FIRST_CALLS = r"""
import time
start = time.perf_counter()
import numpy as np
import fastbn
dtype = np.dtype(DTYPE)
for shape, axis in (((4, 3, 40), 1), ((40, 100), 1), ((4, 5, 6, 3), -1), (None, None),
                    ((16, 8, 2048), 1), ((512, 512), 1), ((32, 32, 16, 16), -1)):
    if shape is None:
        print(f"{time.perf_counter() - start:.2f}")
        continue
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    c = shape[axis]
    y, stats = fastbn.forward(x, axis=axis)
    fastbn.backward(x, x, stats, axis=axis)
    fastbn.forward(x, axis=axis, training=False, running_mean=np.zeros(c), running_var=np.ones(c))
    fastbn.backward(x, x, stats, axis=axis, training=False)
print(f"{time.perf_counter() - start:.2f}")
"""


def first_calls(dtype, cache_dir):
    """Seconds from ``import fastbn`` to the last small tensor's first calls and to the last
    large one's, in a new interpreter."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    script = FIRST_CALLS.replace("DTYPE", repr(dtype))
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                         capture_output=True, text=True).stdout
    return tuple(float(t) for t in out.split()[-2:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = first_calls(args.dtype, cache_dir)
        warm = first_calls(args.dtype, cache_dir)
    print(f"{args.dtype}: cold start (empty Numba cache): small tensors (serial builds) "
          f"{cold[0]:.1f} s, all sizes (both builds) {cold[1]:.1f} s; warm start (import + first "
          f"calls, compiled code from the cache): small tensors {warm[0]:.2f} s, all sizes "
          f"{warm[1]:.2f} s")


if __name__ == "__main__":
    main()
