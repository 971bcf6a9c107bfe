"""A first call compiles (or loads from Numba's cache) only the kernels it runs."""
import json

from _util import run_python

# In a fresh interpreter: the parallel kernels each call brings in, one call after another.
SCRIPT = r"""
import json
import numpy as np
import fastbn
from fastbn import cpu

def loaded():
    return {n for n in dir(cpu) if isinstance(getattr(cpu, n), cpu._ParallelKernel)
            and getattr(cpu, n).parallel.signatures}

new = []
for shape in ((300, 70), (8, 3, 100)):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    before = loaded()
    y, stats = fastbn.forward(x)
    new.append(sorted(loaded() - before))
    before = loaded()
    fastbn.backward(x, x, stats)
    new.append(sorted(loaded() - before))
print(json.dumps(new))
"""

EXPECTED = [
    ["_rows_affine", "_rows_moments"],  # N×D forward
    ["_rows_grad_map", "_rows_grad_sums"],  # N×D backward
    ["_planar_affine", "_planar_moments"],  # N×C×L forward
    ["_planar_grad_map", "_planar_grad_sums"],  # N×C×L backward
]


def test_each_first_call_brings_in_only_its_kernels():
    assert json.loads(run_python("-c", SCRIPT).stdout) == EXPECTED
