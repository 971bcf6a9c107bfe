"""fastbn.distributed under real MPI: `mpiexec -n 2` and `-n 3` on this machine run
tests/mpi_cases.py, whose every check compares with single-process fastbn on the concatenated
batch and with the float64 reference (outputs, running statistics, gradients, uneven and empty
slices, the SyncBatchNorm layer, and the errors for ranks that disagree)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mpi4py", reason="the test extra installs mpi4py and MPICH")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mpiexec():
    """The mpiexec of the MPI that mpi4py was installed with (the mpich wheel puts it beside
    python), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def _run(ranks, script, *args, **environment):
    """``mpiexec -n ranks python -m mpi4py script args``; (stdout, stdout + stderr)."""
    mpiexec = _mpiexec()
    assert mpiexec, "no mpiexec: install the test extra (mpich) or an MPI library"
    env = dict(os.environ, NUMBA_NUM_THREADS="1",  # ranks × threads within the cores
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               **environment)
    # python -m mpi4py: an uncaught exception on one rank aborts them all, rather than a hang
    proc = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py",
                           os.path.join(ROOT, script), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-5000:]
    return proc.stdout, report


@pytest.mark.parametrize("ranks", [2, 3])
def test_synchronized_batch_norm_equals_one_process(ranks):
    stdout, report = _run(ranks, os.path.join("tests", "mpi_cases.py"))
    for rank in range(ranks):
        assert f"rank {rank} of {ranks}: " in stdout, report[-5000:]
    assert "FAILED" not in report and report.count("checks passed") == ranks, report[-5000:]


def test_cuda_arrays_under_the_simulator():
    """The same check with CUDA arrays (Numba's simulator): only the 3·C numbers cross."""
    stdout, report = _run(2, os.path.join("tests", "mpi_cases.py"), NUMBA_ENABLE_CUDASIM="1")
    assert report.count("1 checks passed") == 2, report[-5000:]


def test_import_fastbn_does_not_start_mpi():
    code = ("import sys, fastbn; assert 'mpi4py' not in sys.modules; "
            "import fastbn.distributed; assert 'mpi4py' in sys.modules")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT,
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


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
