"""The GPU path under Numba's CUDA simulator, in a process of its own (tests/cuda_sim_cases.py).

NUMBA_ENABLE_CUDASIM must be set before numba is imported, so the cases run in a subprocess; this
test passes only if every one of them passes. On a machine with a GPU, the same cases run on the
real device when `tests/cuda_sim_cases.py` is run without the simulator... not yet: see README.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_path_under_the_cuda_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("FASTBN_DEVICE", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/cuda_sim_cases.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and "passed" in summary and "skipped" not in summary, (
        proc.stdout[-8000:] + proc.stderr[-3000:])
