"""``python -m fastbn``: compile the kernels, check them, and time them against memcpy, NumPy and
PyTorch (where installed), on the CPU or (``--device cuda``) the GPU."""
import argparse
import os
import platform
import sys
import time

import numba
import numpy as np

import fastbn
from fastbn.cases import LAYOUTS, OPS, Case, torch_batch_norm

NO_GPU = ("python -m fastbn --device cuda: no usable CUDA GPU here; the GPU path needs an NVIDIA "
          "GPU with its driver and the CUDA extra: pip install \"fastbn[cuda]\"")


def _best_time(fn, repeat):
    """Best of ``repeat`` runs, in seconds: the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _compile(dtype, device):
    """Call every kernel once on a small input of each layout (compiling it, or loading the cache)."""
    for layout in LAYOUTS:
        case = Case(layout, layout.small, dtype, device)
        for op in OPS:
            case.synchronized(op.fastbn(case))()
        _, stats = fastbn.forward(case.x, axis=case.axis)
        fastbn.backward(case.dy, case.x, stats, case.gamma, axis=case.axis, training=False)


def _machine(device):
    """What runs the kernels: the CPU's threads, or the GPU's name."""
    cpu = f"{numba.get_num_threads()} threads, {platform.machine()}, {os.cpu_count()} CPUs"
    if device == "cpu":
        return cpu
    from numba import cuda
    name = getattr(cuda.current_context().device, "name", "of Numba's CUDA simulator")
    return f"GPU {name.decode() if isinstance(name, bytes) else name}; {cpu}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the tensors live and fastbn computes (default cpu)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per operation (best kept)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    device, dtype = args.device, np.dtype(args.dtype)
    if device == "cuda" and not fastbn.cuda_available():
        print(NO_GPU, file=sys.stderr)
        return 1
    tolerance = 1e-5 if dtype == np.float32 else 1e-10

    print(f"fastbn {fastbn.__version__}: numpy {np.__version__}, numba {numba.__version__}, "
          f"Python {platform.python_version()}, {_machine(device)}")
    if device == "cpu":
        print(f"Compiling the {dtype} kernels (the first run compiles them, about 15 s on 2 "
              f"cores; later runs load them from Numba's cache in well under a second)...",
              end=" ", flush=True)
    else:
        print(f"Compiling the {dtype} GPU kernels...", end=" ", flush=True)
    start = time.perf_counter()
    _compile(dtype, device)
    layer = f" (threading layer: {numba.threading_layer()})" if device == "cpu" else ""
    print(f"done in {time.perf_counter() - start:.1f} s{layer}")

    rows = []
    failures = []
    for layout in LAYOUTS:
        case = Case(layout, layout.large, dtype, device)
        shape = "x".join(map(str, layout.large))
        error = np.max([e for op in OPS  # NaN, if any
                        for e in case.errors(op, case.synchronized(op.fastbn(case))()).values()])
        verdict = "ok" if error <= tolerance else "FAILED"
        if verdict != "ok":
            failures.append(layout.name)
        print(f"  {layout.name:6s} {shape:>16s}  forward+backward vs NumPy float64: max relative "
              f"error {error:.1e}  {verdict}", flush=True)
        # The yardstick: the fastest plain copy of the tensor with fastbn's thread count.
        memcpy = _best_time(case.synchronized(case.memcpy()), args.repeat)
        if device == "cpu":
            memcpy = min(memcpy, _best_time(case.threaded_copy(), args.repeat))
        bn = torch_batch_norm(case)
        for op in OPS:
            t_ours = _best_time(case.synchronized(op.fastbn(case)), args.repeat)
            t_numpy = device == "cpu" and _best_time(op.numpy(case), max(1, args.repeat // 2))
            t_torch = bn and _best_time(case.synchronized(getattr(bn, op.peer)), args.repeat)
            rows.append((layout.name, shape, op.name, t_ours, memcpy,
                         op.moves * case.host["x"].nbytes, t_numpy, t_torch))
        del case, bn

    where, copy = (("CPU", f"the fastest plain copy of the same tensor (the faster of "
                           f"np.copyto and a copy on Numba's {numba.get_num_threads()} threads)")
                   if device == "cpu" else ("GPU", "a device-to-device copy of the same tensor"))
    print(f"\nTimes in ms (best of {args.repeat}), {dtype}, on the {where}. x copy: time "
          f"over that of {copy}. GB/s: the bytes each op must move at the least (x and y; x, dy "
          f"and dx) over the time. Speed-up: the other's time over fastbn's.")
    header = ("layout", "shape", "op", "fastbn ms", "x copy", "GB/s", "NumPy ms",
              "speed-up vs NumPy", "PyTorch ms", "PyTorch x copy", "speed-up vs PyTorch")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 3 + ["---:"] * 8) + "|")
    missing_torch = "not installed" if device == "cpu" else "no CUDA PyTorch"
    for name, shape, op, t_ours, memcpy, nbytes, t_numpy, t_torch in rows:
        numpy_cells = (f"{t_numpy * 1e3:.1f} | {t_numpy / t_ours:.1f}x" if t_numpy else
                       "n/a on the GPU | –")
        torch_cells = (f"{t_torch * 1e3:.2f} | {t_torch / memcpy:.2f} | {t_torch / t_ours:.1f}x"
                       if t_torch else f"{missing_torch} | – | –")
        print(f"| {name} | {shape} | {op} | {t_ours * 1e3:.2f} | {t_ours / memcpy:.2f} | "
              f"{nbytes / t_ours / 1e9:.1f} | {numpy_cells} | {torch_cells} |")
    if failures:
        print(f"\nFAILED: fastbn disagrees with NumPy on {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
