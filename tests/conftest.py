import os
import sys
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import CPU_SMALL_BLOCKS, shrink_blocks  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "default_blocks: run with fastbn.cpu's default block sizes (not shrunk)")
    config.addinivalue_line(
        "markers", "production_blocks: run with fastbn.cuda's default block sizes, also under "
                   "the CUDA simulator (tests/cuda_cases.py)")


@pytest.fixture(autouse=True)
def small_blocks(request, monkeypatch):
    """Shrink fastbn.cpu's block sizes (CPU_SMALL_BLOCKS) for every test not marked
    default_blocks."""
    import fastbn.cpu
    if request.node.get_closest_marker("default_blocks") is None:
        shrink_blocks(monkeypatch, fastbn.cpu, CPU_SMALL_BLOCKS)
    yield


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, different for every test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# Each kernel family forced in turn (tests/test_kernel_paths.py, tests/test_fused.py): PLANAR_RUN
# 1 sends every view with runs to the planar kernels, a huge one sends everything to the rows ones.
KERNEL_PATHS = {"planar": 1, "rows": 10**9}


@pytest.fixture(params=list(KERNEL_PATHS))
def kernel_path(request, monkeypatch):
    import fastbn.cpu
    monkeypatch.setattr(fastbn.cpu, "PLANAR_RUN", KERNEL_PATHS[request.param])
    return request.param
