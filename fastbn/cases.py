"""The one table of layouts that drives the tests, ``python -m fastbn`` and the benchmarks.

Each layout names a shape convention and its channel axis, with a small shape for tests (big
enough that the multi-chunk paths run once the tests shrink the block sizes), a larger one for a
quick timing on any machine, and the shapes the benchmark suite (``bench/``) times.
"""
from typing import NamedTuple


class Layout(NamedTuple):
    name: str
    axis: int
    small: tuple  # for tests: fast, but more than one chunk at the tests' block sizes
    large: tuple  # for `python -m fastbn`: a few million elements, quick on any machine
    bench: tuple = ()  # for `pytest bench`: the shapes whose speed goals the README reports
    gpu_bench: tuple = ()  # and, with `--bench-device cuda`, these as well


LAYOUTS = (
    Layout("NxD", 1, (37, 11), (16384, 512), bench=((8192, 4096), (256, 1024))),
    Layout("NCL", 1, (5, 3, 29), (64, 128, 1024)),
    Layout("NCHW", 1, (4, 3, 7, 9), (32, 64, 56, 56),
           bench=((64, 64, 112, 112), (32, 256, 28, 28), (64, 3, 224, 224)),
           gpu_bench=((256, 64, 112, 112),)),
    Layout("NCDHW", 1, (3, 2, 4, 5, 6), (8, 32, 16, 28, 28)),
    Layout("NHWC", -1, (4, 6, 7, 5), (32, 56, 56, 64), bench=((64, 112, 112, 64),)),
)
