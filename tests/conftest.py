import os
import sys
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Block sizes small enough that the tests' small shapes run every multi-chunk / multi-tile /
# multi-segment / multi-column-block merge path of the CPU kernels.
# PARALLEL_MIN = 0 sends even these small shapes through the thread pool (the default runs them
# on the calling thread); test_determinism checks that both give the same bits.
SMALL_BLOCKS = {"CHUNK": 16, "TILE_ROWS": 3, "SEGMENT": 40, "COLUMN_BLOCK": 3, "PARALLEL_MIN": 0}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "default_blocks: run with fastbn.cpu's default block sizes (not shrunk)")


@pytest.fixture(autouse=True)
def small_blocks(request, monkeypatch):
    """Shrink fastbn.cpu's block sizes for every test not marked default_blocks."""
    import fastbn.cpu
    if request.node.get_closest_marker("default_blocks") is None:
        for name, value in SMALL_BLOCKS.items():
            monkeypatch.setattr(fastbn.cpu, name, value)
    yield


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, different for every test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
