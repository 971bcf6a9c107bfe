"""fastbn.distributed under real MPI: `mpiexec -n 2` and `-n 3` on this machine run
tests/mpi_cases.py, whose every check compares with single-process fastbn on the concatenated
batch and with the float64 reference (outputs, running statistics, gradients, uneven and empty
slices, the SyncBatchNorm layer, and the errors for ranks that disagree); with CUDA arrays on the
GPU where one is usable, else under Numba's CUDA simulator."""
import os
import re
import shutil
import sys

import pytest

from _util import ROOT, gpu_env, run, run_python

pytest.importorskip("mpi4py", reason="the test extra installs mpi4py and MPICH")

WHERE, GPU_ENV = gpu_env()


def _mpiexec():
    """The mpiexec of the MPI that mpi4py was installed with (the mpich wheel puts it beside
    python), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def _run(ranks, script, *args, env=None):
    """``mpiexec -n ranks python -m mpi4py script args``; (stdout, stdout + stderr)."""
    mpiexec = _mpiexec()
    assert mpiexec, "no mpiexec: install the test extra (mpich) or an MPI library"
    # python -m mpi4py: an uncaught exception on one rank aborts them all, rather than a hang
    proc = run([mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py",
                os.path.join(ROOT, script), *args],
               env={"NUMBA_NUM_THREADS": "1", **(env or {})},  # ranks × threads within the cores
               timeout=600)
    return proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("ranks", [2, 3])
def test_synchronized_batch_norm_equals_one_process(ranks):
    # CUDA switched off: rank 0's device="cuda" fails (and the others hear of it) on any machine
    stdout, report = _run(ranks, os.path.join("tests", "mpi_cases.py"),
                          env={"NUMBA_DISABLE_CUDA": "1", "NUMBA_ENABLE_CUDASIM": None})
    for rank in range(ranks):
        assert f"rank {rank} of {ranks}: " in stdout, report[-5000:]
    assert "FAILED" not in report and report.count("checks passed") == ranks, report[-5000:]


@pytest.mark.parametrize("where", [WHERE])
def test_cuda_arrays(where):
    """The checks that take CUDA arrays (the plain op, and the fused residual add and ReLU), on
    the GPU or the simulator: only the 3·C numbers cross."""
    stdout, report = _run(2, os.path.join("tests", "mpi_cases.py"), "--gpu", env=GPU_ENV)
    assert report.count("2 checks passed") == 2, f"on the {where}:\n{report[-5000:]}"


def test_import_fastbn_does_not_start_mpi():
    run_python("-c", "import sys, fastbn; assert 'mpi4py' not in sys.modules; "
               "import fastbn.distributed; assert 'mpi4py' in sys.modules", timeout=300)


def test_data_parallel_example_trains_the_single_process_model():
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")
    stdout, report = _run(2, os.path.join("examples", "data_parallel.py"), "--steps", "100",
                          "--check")
    accuracies = re.findall(r"test accuracy ([0-9.]+)", stdout)
    gap = float(re.search(r"largest parameter difference ([0-9.e+-]+)", stdout).group(1))
    assert len(accuracies) == 2 and float(accuracies[0]) > 0.5, report
    assert gap < 1e-4, report  # float32 sums in another order, 100 steps


def test_benchmark_runs_and_checks_its_results():
    stdout, report = _run(2, os.path.join("bench", "distributed.py"), "--quick", "--repeat", "1")
    assert stdout.count("| train fwd |") == stdout.count("| train bwd |") == 5, report
