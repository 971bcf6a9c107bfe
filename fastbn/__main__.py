"""``python -m fastbn``: compile the kernels and check them against NumPy in float64 on small
shapes; with ``--bench``, also check them on larger shapes and time them against memcpy, NumPy
and PyTorch (where installed). On the CPU or (``--device cuda``) the GPU.

On the CPU, small shapes run the kernels' serial builds; the builds for Numba's thread pool (for
tensors of 2**18 values or more) compile at their first call, or here with ``--bench``."""
import argparse
import os
import platform
import sys
import time

import numba
import numpy as np

import fastbn
from fastbn.cases import (EPS, FAMILY, LAYOUTS, MOMENTUM, OPS, Case, NormCase, host, on_device,
                          relative_error, torch_batch_norm)

NO_GPU = ("python -m fastbn --device cuda: no usable CUDA GPU here; the GPU path needs an NVIDIA "
          "GPU with its driver and the CUDA extra: pip install \"fastbn[cuda]\"")

TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}  # max relative error
DEFAULT_REPEAT = 5
# The layer's and the family's checks run on fixed shapes, whatever LAYOUTS holds.
LAYER_LAYOUT = next(layout for layout in LAYOUTS if layout.name == "NCHW")
LAYER_NORM = next(norm for norm in FAMILY if norm.function == "layer_norm")
OPS_BY_NAME = {op.name: op for op in OPS}


def _best_time(fn, repeat):
    """Best of ``repeat`` runs, in seconds: the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _layer_norm_reference(x, dy, gamma, beta):
    """Layer norm over x's last axis and its gradients, in float64: ``(y, dx, dgamma, dbeta)``."""
    x, dy, gamma, beta = (a.astype(np.float64) for a in (x, dy, gamma, beta))
    invstd = 1 / np.sqrt(x.var(-1, keepdims=True) + EPS)
    xhat = (x - x.mean(-1, keepdims=True)) * invstd
    dxhat = dy * gamma
    dx = invstd * (dxhat - dxhat.mean(-1, keepdims=True)
                   - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return gamma * xhat + beta, dx, (dy * xhat).sum(rows), dy.sum(rows)


def _layer_norm_case(dtype, device):
    """The layer-norm table's small case (host arrays) and its x and dy where the op runs."""
    case = NormCase(LAYER_NORM, LAYER_NORM.small, dtype)
    x, dy = on_device(case.x, case.dy) if device == "cuda" else (case.x, case.dy)
    return case, x, dy


def _compile(dtype, device):
    """Call every kernel once on a small input of each layout, and layer norm's (compiling them,
    or loading the cache)."""
    for layout in LAYOUTS:
        case = Case(layout, layout.small, dtype, device)
        for op in OPS:
            case.synchronized(op.fastbn(case))()
        _, stats = fastbn.forward(case.x, axis=case.axis)
        fastbn.backward(case.dy, case.x, stats, case.gamma, axis=case.axis, training=False)
    case, x, dy = _layer_norm_case(dtype, device)
    _, stats = fastbn.layer_norm(x, case.shape[-1:], case.gamma, case.beta, eps=EPS)
    fastbn.layer_norm_backward(dy, x, stats, case.shape[-1:], case.gamma)


def _layout_error(case):
    """The largest relative error of every op of OPS on ``case`` (NaN, if any)."""
    return np.max([error for op in OPS
                   for error in case.errors(op, case.synchronized(op.fastbn(case))()).values()])


def _layer_error(dtype, device):
    """The largest relative error of a ``fastbn.BatchNorm`` training step on LAYER_LAYOUT's
    small shape: y, dx, dgamma, dbeta and the updated running statistics."""
    case = Case(LAYER_LAYOUT, LAYER_LAYOUT.small, dtype, device)
    layer = fastbn.BatchNorm(case.host["gamma"].size, axis=case.axis, eps=EPS,
                             momentum=MOMENTUM, dtype=dtype)
    for name in ("gamma", "beta", "running_mean", "running_var"):
        getattr(layer, name)[...] = case.host[name]
    y = layer(case.x)
    dx = layer.backward(case.dy)
    errors = [*case.errors(OPS_BY_NAME["train fwd"], y).values(),
              *case.errors(OPS_BY_NAME["train bwd"], (dx, layer.dgamma, layer.dbeta)).values()]
    x = case.host["x"].astype(np.float64)
    others = tuple(a for a in range(x.ndim) if a != case.axis % x.ndim)
    for name, batch in (("running_mean", x.mean(others)), ("running_var", x.var(others, ddof=1))):
        expected = (1 - MOMENTUM) * case.host[name].astype(np.float64) + MOMENTUM * batch
        errors.append(relative_error(host(getattr(layer, name)), expected))
    return np.max(errors)


def _layer_norm_error(dtype, device):
    """The largest relative error of ``fastbn.layer_norm`` and ``layer_norm_backward`` (y, dx,
    dgamma, dbeta) on the layer-norm table's small shape."""
    case, x, dy = _layer_norm_case(dtype, device)
    y, stats = fastbn.layer_norm(x, case.shape[-1:], case.gamma, case.beta, eps=EPS)
    y = host(y)  # before the backward runs
    dx, dgamma, dbeta = fastbn.layer_norm_backward(dy, x, stats, case.shape[-1:], case.gamma)
    expected = _layer_norm_reference(case.x, case.dy, case.gamma, case.beta)
    return np.max([relative_error(host(actual), reference)
                   for actual, reference in zip((y, dx, dgamma, dbeta), expected, strict=True)])


def _report(label, shape, error, tolerance, note=""):
    """Print one check's line; returns whether it passed (NaN fails)."""
    passed = error <= tolerance
    print(f"  {label:10s} {'x'.join(map(str, shape)):>16s}  {error:.1e}  "
          f"{'ok' if passed else 'FAILED'}{note}", flush=True)
    return passed


def _check(dtype, device, tolerance):
    """Check every op of every layout on its small shape, the layer and layer norm; returns the
    names of those that failed."""
    failures = []
    for layout in LAYOUTS:
        error = _layout_error(Case(layout, layout.small, dtype, device))
        if not _report(layout.name, layout.small, error, tolerance):
            failures.append(layout.name)
    if not _report("BatchNorm", LAYER_LAYOUT.small, _layer_error(dtype, device), tolerance,
                   "  (the layer; its running statistics too)"):
        failures.append("BatchNorm")
    if not _report("layer_norm", LAYER_NORM.small, _layer_norm_error(dtype, device),
                   tolerance):
        failures.append("layer_norm")
    return failures


def _bench(dtype, device, tolerance, repeat):
    """Check every op of every layout on its large shape and print the table of times against
    the fastest copy, NumPy and PyTorch; returns the layouts whose check failed."""
    rows = []
    failures = []
    for layout in LAYOUTS:
        case = Case(layout, layout.large, dtype, device)
        shape = "x".join(map(str, layout.large))
        if not _report(layout.name, layout.large, _layout_error(case), tolerance):
            failures.append(f"{layout.name} {shape}")
        # The yardstick: the fastest plain copy of the tensor with fastbn's thread count.
        memcpy = _best_time(case.synchronized(case.memcpy()), repeat)
        if device == "cpu":
            memcpy = min(memcpy, _best_time(case.threaded_copy(), repeat))
        bn = torch_batch_norm(case)
        for op in OPS:
            t_ours = _best_time(case.synchronized(op.fastbn(case)), repeat)
            t_numpy = device == "cpu" and _best_time(op.numpy(case), max(1, repeat // 2))
            t_torch = bn and _best_time(case.synchronized(getattr(bn, op.peer)), repeat)
            rows.append((layout.name, shape, op.name, t_ours, memcpy,
                         op.moves * case.host["x"].nbytes, t_numpy, t_torch))
        del case, bn

    where, copy = (("CPU", f"the fastest plain copy of the same tensor (the faster of "
                           f"np.copyto and a copy on Numba's {numba.get_num_threads()} threads)")
                   if device == "cpu" else ("GPU", "a device-to-device copy of the same tensor"))
    print(f"\nTimes in ms (best of {repeat}), {dtype}, on the {where}. x copy: time "
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
    return failures


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
    parser.add_argument("--bench", action="store_true",
                        help="also check the layouts' larger shapes and time every op against "
                             "a plain copy, NumPy and PyTorch (under a minute on 2 cores)")
    parser.add_argument("--repeat", type=int,
                        help=f"timed runs per operation, best kept (default {DEFAULT_REPEAT}); "
                             f"implies --bench")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    # --repeat only means something to --bench, and `python -m fastbn --repeat N` timed before
    # --bench existed: it still does.
    bench = args.bench or args.repeat is not None
    device, dtype = args.device, np.dtype(args.dtype)
    if device == "cuda" and not fastbn.cuda_available():
        print(NO_GPU, file=sys.stderr)
        return 1
    tolerance = TOLERANCE[dtype]
    started = time.perf_counter()

    print(f"fastbn {fastbn.__version__}: numpy {np.__version__}, numba {numba.__version__}, "
          f"Python {platform.python_version()}, {_machine(device)}")
    if device == "cpu":
        print(f"Compiling the {dtype} kernels (the first run compiles them, about 20 s on 2 idle "
              f"cores; later runs load them from Numba's cache, in under a second)...",
              end=" ", flush=True)
    else:
        print(f"Compiling the {dtype} GPU kernels...", end=" ", flush=True)
    compile_started = time.perf_counter()
    _compile(dtype, device)
    layer = f" (threading layer: {numba.threading_layer()})" if device == "cpu" else ""
    print(f"done in {time.perf_counter() - compile_started:.1f} s{layer}")

    print(f"Forward and backward against NumPy in float64, max relative error (at most "
          f"{tolerance:.0e}):")
    failures = _check(dtype, device, tolerance)
    if bench:
        print("The larger shapes, checked the same way, then timed:", flush=True)
        failures += _bench(dtype, device, tolerance, args.repeat or DEFAULT_REPEAT)
    print(f"\nTotal {time.perf_counter() - started:.1f} s: {'FAILED' if failures else 'all ok'}")
    if failures:
        print(f"FAILED: fastbn disagrees with NumPy on {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
