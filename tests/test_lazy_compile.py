"""A first call compiles only the kernels its op runs: a forward never compiles backward's."""
import json

from _util import run_python

# In a fresh interpreter with an empty Numba cache (so that every kernel is compiled, not loaded
# inside a cached step): the kernels each call brings in, either build, one call after another.
SCRIPT = r"""
import json
import numpy as np
import fastbn
from fastbn import cpu

def compiled():
    return {name for name, twin in vars(cpu).items()
            if isinstance(twin, cpu._Twin) and twin._kernel
            and any(build.signatures for build in twin._builds.values())}

new = []
for shape in ((300, 70), (8, 3, 100)):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    before = compiled()
    y, stats = fastbn.forward(x)
    new.append(sorted(compiled() - before))
    before = compiled()
    fastbn.backward(x, x, stats)
    new.append(sorted(compiled() - before))
print(json.dumps(new))
"""

# A step holds both kernel families (planar and rows), so the first call of an op compiles them
# all; the fused planar kernels are compiled into the parallel builds alone (these small tensors
# run the serial ones).
EXPECTED = [
    ["_planar_affine", "_planar_moments", "_rows_affine", "_rows_moments"],  # forward
    ["_planar_grad_map", "_planar_grad_sums", "_rows_grad_map", "_rows_grad_sums"],  # backward
    [],  # forward of another layout, same dtype: compiled already
    [],  # backward, the same
]


def test_each_first_call_brings_in_only_its_kernels(tmp_path):
    result = run_python("-c", SCRIPT, env={"NUMBA_CACHE_DIR": str(tmp_path)})
    assert json.loads(result.stdout) == EXPECTED
