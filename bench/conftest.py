"""Options of the benchmark suite, the thread count, and what the JSON records about the run.

``pytest bench ...`` loads this file because ``bench`` is named on the command line; a plain
``pytest`` collects only ``tests/`` (``testpaths`` in pyproject.toml) and never sees it.
"""
import importlib.metadata
import shlex

import numba
import numpy as np

import fastbn

try:
    import torch
except ImportError:
    torch = None
else:
    # The same number of cores for PyTorch as for fastbn's Numba kernels.
    torch.set_num_threads(numba.get_num_threads())


def pytest_addoption(parser):
    group = parser.getgroup("fastbn benchmarks")
    group.addoption("--bench-dtype", choices=["float32", "float64"], default="float32",
                    help="dtype of the benchmarked tensors (default float32)")
    group.addoption("--bench-device", choices=["cpu", "cuda"], default="cpu",
                    help="where the tensors live and fastbn and PyTorch compute (default cpu)")
    group.addoption("--bench-quick", action="store_true",
                    help="time each layout's small test shape instead of its benchmark shapes "
                         "(a smoke test of the suite: seconds)")


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = None
    if config.getoption("bench_device") == "cuda":
        from numba import cuda
        name = cuda.get_current_device().name
        machine_info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    machine_info.update(
        fastbn=fastbn.__version__, numpy=np.__version__, numba=numba.__version__,
        torch=torch.__version__ if torch is not None else None,
        threads=numba.get_num_threads(), threading_layer=layer,
        **{name: _installed(package) for name, package in PEER_PACKAGES.items()})


PEER_PACKAGES = {"jax": "jaxlib", "tensorflow": "tensorflow-cpu", "onnxruntime": "onnxruntime"}


def _installed(package):
    """The installed version of ``package`` (read without importing it), or None."""
    for name in (package, package.removesuffix("-cpu")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["command"] = shlex.join(["pytest", *config.invocation_params.args])
    output_json["dtype"] = config.getoption("bench_dtype")
