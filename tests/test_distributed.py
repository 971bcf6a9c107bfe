"""fastbn.distributed under real MPI: `mpiexec -n 2` and `-n 3` on this machine run
tests/mpi_cases.py, whose every check compares with single-process fastbn on the concatenated
batch and with the float64 reference (outputs, running statistics, gradients, uneven and empty
slices, the SyncBatchNorm layer, and the errors for ranks that disagree)."""
import os
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


@pytest.mark.parametrize("ranks", [2, 3])
def test_synchronized_batch_norm_equals_one_process(ranks):
    mpiexec = _mpiexec()
    assert mpiexec, "no mpiexec: install the test extra (mpich) or an MPI library"
    env = dict(os.environ, NUMBA_NUM_THREADS="1",  # ranks × threads within the cores
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([mpiexec, "-n", str(ranks), sys.executable,
                           os.path.join(ROOT, "tests", "mpi_cases.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-5000:]
    for rank in range(ranks):
        assert f"rank {rank} of {ranks}: " in proc.stdout, report[-5000:]
    assert "FAILED" not in report and report.count("checks passed") == ranks, report[-5000:]


def test_import_fastbn_does_not_start_mpi():
    code = ("import sys, fastbn; assert 'mpi4py' not in sys.modules; "
            "import fastbn.distributed; assert 'mpi4py' in sys.modules")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT,
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
