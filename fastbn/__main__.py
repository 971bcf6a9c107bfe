"""``python -m fastbn``: compile the kernels, check them, and time them against memcpy, NumPy and
PyTorch (where installed)."""
import argparse
import os
import platform
import sys
import time

import numba
import numpy as np

import fastbn
from fastbn import _naive
from fastbn.cases import LAYOUTS


def _best_time(fn, repeat):
    """Best of ``repeat`` runs, in seconds: the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _inputs(shape, axis, dtype, rng):
    x = rng.normal(3.0, 2.0, size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    channels = shape[axis]
    gamma = rng.uniform(0.5, 1.5, channels).astype(dtype)
    beta = rng.normal(size=channels).astype(dtype)
    return x, dy, gamma, beta


def _torch_batch_norm(x, dy, gamma, beta, axis):
    """PyTorch's ops on the same arrays, or None where torch is not installed."""
    try:
        from fastbn._torch import TorchBatchNorm
    except ImportError:
        return None
    return TorchBatchNorm(x, dy, gamma, beta, axis)


def _ops(x, dy, gamma, beta, axis, out):
    """(name, bytes moved at the least, fastbn call, NumPy call, PyTorch call or None) per op."""
    channels = x.shape[axis]
    running_mean = np.zeros(channels, x.dtype)
    running_var = np.ones(channels, x.dtype)
    _, stats = fastbn.forward(x, gamma, beta, axis=axis)
    _, mean, invstd = _naive.forward(x, gamma, beta, axis, True)
    eval_kw = dict(axis=axis, training=False, running_mean=running_mean, running_var=running_var)
    torch_bn = _torch_batch_norm(x, dy, gamma, beta, axis)
    return [
        ("train fwd", 2 * x.nbytes,
         lambda: fastbn.forward(x, gamma, beta, axis=axis, out=out),
         lambda: _naive.forward(x, gamma, beta, axis, True),
         torch_bn and torch_bn.train_forward),
        ("eval fwd", 2 * x.nbytes,
         lambda: fastbn.forward(x, gamma, beta, out=out, **eval_kw),
         lambda: _naive.forward(x, gamma, beta, axis, False, running_mean, running_var),
         torch_bn and torch_bn.eval_forward),
        ("train bwd", 3 * x.nbytes,
         lambda: fastbn.backward(dy, x, stats, gamma, axis=axis, out=out),
         lambda: _naive.backward(dy, x, mean, invstd, gamma, axis, True),
         torch_bn and torch_bn.train_backward),
    ]


def _compile(dtype):
    """Call every kernel once on a small input of each layout (compiling it, or loading the cache)."""
    rng = np.random.default_rng(0)
    for layout in LAYOUTS:
        x, dy, gamma, beta = _inputs(layout.small, layout.axis, dtype, rng)
        running = np.zeros(x.shape[layout.axis]), np.ones(x.shape[layout.axis])
        _, stats = fastbn.forward(x, gamma, beta, axis=layout.axis)
        fastbn.forward(x, gamma, beta, axis=layout.axis, training=False,
                       running_mean=running[0], running_var=running[1])
        fastbn.backward(dy, x, stats, gamma, axis=layout.axis)
        fastbn.backward(dy, x, stats, gamma, axis=layout.axis, training=False)


def _relative_error(actual, expected):
    return float(np.max(np.abs(actual - expected)) / max(1.0, float(np.max(np.abs(expected)))))


def _check(x, dy, gamma, beta, axis):
    """Largest relative error of y, dx, dgamma, dbeta against NumPy in float64."""
    wide = [a.astype(np.float64) for a in (x, dy, gamma, beta)]
    y_ref, mean, invstd = _naive.forward(wide[0], wide[2], wide[3], axis, True)
    grads_ref = _naive.backward(wide[1], wide[0], mean, invstd, wide[2], axis, True)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis)
    grads = fastbn.backward(dy, x, stats, gamma, axis=axis)
    errors = [_relative_error(y, y_ref)]
    errors += [_relative_error(g, r) for g, r in zip(grads, grads_ref)]
    return max(errors)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per operation (best kept)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    dtype = np.dtype(args.dtype)
    tolerance = 1e-5 if dtype == np.float32 else 1e-10

    print(f"fastbn {fastbn.__version__}: numpy {np.__version__}, numba {numba.__version__}, "
          f"Python {platform.python_version()}, {numba.get_num_threads()} threads, "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    print(f"Compiling the {dtype} kernels (the first run compiles them, which takes 10-15 s on 2 "
          f"cores; later runs load them from Numba's cache in well under a second)...", end=" ",
          flush=True)
    start = time.perf_counter()
    _compile(dtype)
    print(f"done in {time.perf_counter() - start:.1f} s (threading layer: {numba.threading_layer()})")

    rng = np.random.default_rng(1)
    rows = []
    failures = []
    for layout in LAYOUTS:
        x, dy, gamma, beta = _inputs(layout.large, layout.axis, dtype, rng)
        error = _check(x, dy, gamma, beta, layout.axis)
        verdict = "ok" if error <= tolerance else "FAILED"
        if verdict != "ok":
            failures.append(layout.name)
        print(f"  {layout.name:6s} {'x'.join(map(str, x.shape)):>16s}  forward+backward vs NumPy "
              f"float64: max relative error {error:.1e}  {verdict}", flush=True)
        out = np.empty_like(x)
        memcpy = _best_time(lambda: np.copyto(out, x), args.repeat)
        for name, nbytes, ours, numpy_version, torch_version in _ops(x, dy, gamma, beta,
                                                                     layout.axis, out):
            t_ours = _best_time(ours, args.repeat)
            t_numpy = _best_time(numpy_version, max(1, args.repeat // 2))
            t_torch = torch_version and _best_time(torch_version, args.repeat)
            rows.append((layout.name, "x".join(map(str, x.shape)), name, t_ours, memcpy, nbytes,
                         t_numpy, t_torch))

    print(f"\nTimes in ms (best of {args.repeat}), {dtype}. x memcpy: time over that of np.copyto "
          f"of the same tensor (1 thread). GB/s: the bytes each op must move at the least (x and "
          f"y; x, dy and dx) over the time. Speed-up: the other's time over fastbn's.")
    header = ("layout", "shape", "op", "fastbn ms", "x memcpy", "GB/s", "NumPy ms",
              "speed-up vs NumPy", "PyTorch ms", "PyTorch x memcpy", "speed-up vs PyTorch")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 3 + ["---:"] * 8) + "|")
    for name, shape, op, t_ours, memcpy, nbytes, t_numpy, t_torch in rows:
        torch_cells = (f"{t_torch * 1e3:.2f} | {t_torch / memcpy:.2f} | {t_torch / t_ours:.1f}x"
                       if t_torch else "not installed | – | –")
        print(f"| {name} | {shape} | {op} | {t_ours * 1e3:.2f} | {t_ours / memcpy:.2f} | "
              f"{nbytes / t_ours / 1e9:.1f} | {t_numpy * 1e3:.1f} | {t_numpy / t_ours:.1f}x | "
              f"{torch_cells} |")
    if failures:
        print(f"\nFAILED: fastbn disagrees with NumPy on {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
