"""fastbn's threads beside NumPy's BLAS: the idle spin of GNU OpenMP's workers, set at import
unless the user chose one, and the calls that stay on the calling thread."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn
import fastbn.cpu

pytestmark = pytest.mark.default_blocks  # PARALLEL_MIN as shipped

# In a fresh process: import fastbn, run one call on Numba's pool, then have the GNU OpenMP
# runtime that Numba loaded print the settings it took (omp_display_env, to the C stderr).
PROBE = """
import ctypes, os, numba, numpy as np
import fastbn, fastbn.cpu
fastbn.cpu.PARALLEL_MIN = 0
fastbn.forward(np.arange(12, dtype=np.float32).reshape(4, 3))
print("environ", os.environ.get("GOMP_SPINCOUNT"), flush=True)
from numba.np.ufunc import omppool
assert numba.threading_layer() == "omp" and omppool.openmp_vendor == "GNU", numba.threading_layer()
ctypes.CDLL("libgomp.so.1").omp_display_env(1)
"""


def _probe(**variables):
    env = {k: v for k, v in os.environ.items() if k not in fastbn.cpu.WAIT_VARIABLES}
    env.update(variables, NUMBA_THREADING_LAYER="omp")
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    settings = dict(line.strip().split(" = ", 1) for line in done.stderr.splitlines()
                    if " = " in line)
    return done.stdout.split()[1], settings


@pytest.mark.parametrize("environ", [{}, {"OMP_WAIT_POLICY": "active"},
                                     {"GOMP_SPINCOUNT": "100"}, {"OMP_WAIT_POLICY": ""}])
def test_the_idle_spin_is_set_only_where_the_user_set_none(environ):
    before = dict(environ)
    assert fastbn.cpu._shorten_idle_spin(environ) == (not before)
    assert environ == (before or {"GOMP_SPINCOUNT": fastbn.cpu.IDLE_SPIN})


def test_gnu_openmp_takes_the_short_spin_by_default():
    environ, settings = _probe()
    assert environ == fastbn.cpu.IDLE_SPIN
    assert settings["GOMP_SPINCOUNT"] == f"'{fastbn.cpu.IDLE_SPIN}'"


@pytest.mark.parametrize("variables, spin, policy", [
    ({"OMP_WAIT_POLICY": "active"}, None, "'ACTIVE'"),
    ({"GOMP_SPINCOUNT": "12345"}, "'12345'", None),
])
def test_a_user_setting_wins(variables, spin, policy):
    environ, settings = _probe(**variables)
    assert environ == variables.get("GOMP_SPINCOUNT", "None")  # fastbn added nothing
    if spin:
        assert settings["GOMP_SPINCOUNT"] == spin
    if policy:
        assert settings["OMP_WAIT_POLICY"] == policy
        assert settings["GOMP_SPINCOUNT"] != f"'{fastbn.cpu.IDLE_SPIN}'"


def test_small_work_stays_on_the_calling_thread(monkeypatch):
    """The build follows the work: values times the step's cost against PARALLEL_MIN (the
    family's steps weigh more per value)."""
    step, family = fastbn.cpu._backward, fastbn.cpu._group_backward
    limit = fastbn.cpu.PARALLEL_MIN
    monkeypatch.setattr(fastbn.cpu, "_policy", fastbn.cpu.PARALLEL)
    assert step.build(limit - 1) is step.serial
    assert step.build(limit) is step.parallel
    assert family.build(limit // fastbn.cpu.FAMILY_COST - 1) is family.serial
    assert family.build(limit // fastbn.cpu.FAMILY_COST) is family.parallel


def test_the_eval_batch_of_a_trainer_runs_serially_with_the_same_bits(monkeypatch):
    """A 360×128 eval batch (the trainer's of issue 26) no longer wakes the pool, and gives the
    pool's bits."""
    x = np.random.default_rng(0).normal(size=(360, 128)).astype(np.float32)
    mean, var = np.zeros(128, np.float32), np.ones(128, np.float32)
    serial, _ = fastbn.forward(x, training=False, running_mean=mean, running_var=var)
    assert x.size < fastbn.cpu.PARALLEL_MIN
    monkeypatch.setattr(fastbn.cpu, "PARALLEL_MIN", 0)
    pooled, _ = fastbn.forward(x, training=False, running_mean=mean, running_var=var)
    np.testing.assert_array_equal(serial, pooled)
