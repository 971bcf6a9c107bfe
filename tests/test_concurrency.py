"""Threads and forked children: the same bits as sequential calls, under every threading layer
this machine has (fastbn.cpu's execution policies).

Each layer runs in a fresh interpreter (Numba picks its layer once per process), which
* computes forward, eval forward and backward for 8 cases of several layouts, one after another;
* runs the same calls from 8 Python threads at once (released together by a barrier), 3 times
  each, and compares bitwise;
* forks a child (os.fork, then a multiprocessing 'fork' pool) that recomputes them all.
"""
import importlib.util
import json

import pytest

from _util import run_python

SCRIPT = r"""
import json, multiprocessing, os, sys, threading
import numpy as np
import numba
import fastbn
from fastbn import cpu

SHAPES = [((16, 6, 40, 40), 1), ((300, 70), 1), ((8, 12, 12, 24), -1), ((2, 3, 20000), 1),
          ((40, 5, 7), 1), ((500, 300), 1), ((1, 4, 300, 300), 1), ((20, 9), 0)]


def case(i):
    shape, axis = SHAPES[i]
    rng = np.random.default_rng(i)
    dtype = np.float32 if i % 2 else np.float64
    x = (rng.standard_normal(shape) * 3 + 10 * i).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    return x, dy, rng.uniform(0.5, 2, c), rng.uniform(-1, 1, c), axis


def run(i):
    x, dy, gamma, beta, axis = case(i)
    rm, rv = np.zeros(gamma.size), np.ones(gamma.size)
    y, s = fastbn.forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
    dx, dg, db = fastbn.backward(dy, x, s, gamma, axis=axis)
    ye, _ = fastbn.forward(x, gamma, beta, axis=axis, training=False, running_mean=rm,
                           running_var=rv)
    return b"".join(a.tobytes() for a in (y, s.mean, s.invstd, rm, rv, dx, dg, db, ye))


expected = [run(i) for i in range(len(SHAPES))]
report = {"layer": numba.threading_layer(), "policy": cpu.execution_policy()}
if report["layer"] == "omp":
    from numba.np.ufunc import omppool
    report["openmp_vendor"] = omppool.openmp_vendor

barrier = threading.Barrier(len(SHAPES))
got = [[] for _ in SHAPES]

def work(i):
    barrier.wait()
    for _ in range(3):
        got[i].append(run(i))

threads = [threading.Thread(target=work, args=(i,)) for i in range(len(SHAPES))]
for t in threads:
    t.start()
for t in threads:
    t.join(300)
report["threads_equal"] = all(len(g) == 3 and all(r == e for r in g)
                              for g, e in zip(got, expected))

read, write = os.pipe()
pid = os.fork()
if pid == 0:
    ok = all(run(i) == e for i, e in enumerate(expected))
    os.write(write, json.dumps([ok, cpu.execution_policy()]).encode())
    os._exit(0)
_, status = os.waitpid(pid, 0)
report["fork_status"] = status
report["fork_equal"], report["fork_policy"] = json.loads(os.read(read, 1000) or b"[null, null]")

with multiprocessing.get_context("fork").Pool(2) as pool:
    report["pool_equal"] = pool.map(run, range(len(SHAPES))) == expected
print(json.dumps(report))
"""


def _layers():
    layers = ["omp", "workqueue"]
    if importlib.util.find_spec("tbb") is not None:
        layers.append("tbb")
    return layers


@pytest.mark.parametrize("layer", _layers())
def test_threads_and_forked_children_get_the_sequential_bits(layer):
    proc = run_python("-c", SCRIPT, env={"NUMBA_THREADING_LAYER": layer, "NUMBA_NUM_THREADS": "2"},
                      timeout=900)
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["layer"] == layer
    # workqueue cannot take two launches at once: fastbn serializes its kernels there
    assert report["policy"] == ("locked" if layer == "workqueue" else "parallel")
    assert report["threads_equal"]
    assert report["fork_status"] == 0, "the forked child died"
    assert report["fork_equal"] and report["pool_equal"]
    # a GNU OpenMP pool does not survive fork(): the child runs the serial compilations
    gnu = layer == "omp" and report["openmp_vendor"] == "GNU"
    assert report["fork_policy"] == ("serial" if gnu else report["policy"])
