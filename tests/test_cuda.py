"""The GPU path, in processes of their own: on the GPU where numba.cuda finds one, else under
Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, which must be set before numba is imported).

The test ids say which one ran (``real GPU`` or ``CUDA simulator``). Asking whether a GPU is
usable happens in a subprocess too, so that this process never initializes CUDA.
"""
import pytest

from _util import gpu_env, gpu_usable, run_python

WHERE, ENV = gpu_env()


@pytest.mark.parametrize("where", [WHERE])
def test_gpu_cases(where):
    """Every case of tests/cuda_cases.py and tests/cuda_interface_cases.py passes, none
    skipped."""
    proc = run_python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda_cases.py",
                      "tests/cuda_interface_cases.py", env=dict(ENV, FASTBN_DEVICE=None),
                      timeout=1800, check=False)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and "passed" in summary and "skipped" not in summary, (
        f"tests/cuda_cases.py on the {where}:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}")


def test_cuda_available_agrees_with_numba():
    """fastbn.cuda_available() is the bool that numba.cuda.is_available() gives (no simulator)."""
    proc = run_python("-c", "import fastbn; print(repr(fastbn.cuda_available()))",
                      env={"NUMBA_ENABLE_CUDASIM": None}, timeout=300)
    assert proc.stdout.split()[-1] == repr(gpu_usable()), proc.stdout


ORDINAL_QUERY = """
import fastbn.cuda
from numba import cuda
from numba.cuda.cudadrv.error import CudaSupportError
ordinal = fastbn.cuda._ordinal_query()  # the driver API's names, resolved without a GPU
if fastbn.cuda.available():
    pointer = fastbn.cuda.interface(cuda.device_array(4))["data"][0]
    print(ordinal(pointer) == cuda.get_current_device().id)
else:
    try:
        ordinal(1 << 20)
    except CudaSupportError:  # as far as it goes without a driver
        print(True)
"""


@pytest.mark.parametrize("where", ["real GPU" if gpu_usable() else "no GPU"])
def test_the_pointer_query_runs_on_the_installed_numba(where):
    """fastbn.cuda's question to the driver (which GPU holds a pointer, asked when several are
    visible) resolves on the installed numba.cuda (numba-cuda's bindings, or numba's ctypes API)
    outside the simulator: on a GPU it names the current one; without one it gets as far as the
    driver."""
    proc = run_python("-c", ORDINAL_QUERY, env={"NUMBA_ENABLE_CUDASIM": None}, timeout=300)
    assert proc.stdout.split()[-1:] == ["True"], proc.stdout + proc.stderr


LAUNCHER = """
import re, warnings
import fastbn.cuda
warnings.simplefilter("error")  # a warning that escapes raises
first = fastbn.cuda._launcher(fastbn.cuda._cast, 1, 256, 0)
print(first is fastbn.cuda._launcher(fastbn.cuda._cast, 1, 256, 0))
try:
    fastbn.cuda._cast[3, 256, 0]
except Warning as warning:
    print(type(warning).__name__, bool(re.match(fastbn.cuda._LOW_OCCUPANCY, str(warning))))
"""


def test_launches_are_configured_once_without_the_warning():
    """On the installed numba.cuda's own dispatcher (no simulator; configuring needs no GPU):
    fastbn's configuration of a small grid is made once and reused, and its low-occupancy
    warning, whichever class the installed numba gives it, does not escape, while someone
    else's configuration still warns with the message fastbn filters."""
    proc = run_python("-c", LAUNCHER, env={"NUMBA_ENABLE_CUDASIM": None}, timeout=300)
    assert proc.stdout.split()[-3:] == ["True", "NumbaPerformanceWarning", "True"], (
        proc.stdout + proc.stderr)


@pytest.mark.parametrize("where", ["real GPU" if gpu_usable() else "no GPU"])
def test_python_m_fastbn_device_cuda(where):
    """``python -m fastbn --device cuda``: the table on a GPU; without one, a one-line message
    that says what is missing, and exit status 1 without a traceback."""
    proc = run_python("-m", "fastbn", "--device", "cuda", "--bench", "--repeat", "1",
                      env={"NUMBA_ENABLE_CUDASIM": None}, timeout=900, check=False)
    output = proc.stdout + proc.stderr
    if where == "real GPU":
        assert proc.returncode == 0, output
        assert "| NCHW |" in proc.stdout and "FAILED" not in output, output
    else:
        assert proc.returncode == 1 and "Traceback" not in output, output
        message = proc.stderr.strip()
        assert "\n" not in message and "NVIDIA GPU" in message, output
        assert 'pip install "fastbn[cuda]"' in message and proc.stdout == "", output
