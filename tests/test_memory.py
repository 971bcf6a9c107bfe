"""Memory: forward and backward allocate nothing the size of x besides their outputs, and
repeated calls do not grow the process.

Measured in a fresh interpreter from the kernel's view, its resident memory (tracemalloc misses
Numba's allocations): Linux resets the peak (VmHWM) when "5" is written to
/proc/self/clear_refs, so the peak of one call is read exactly.
"""
import json
import os

import pytest

from _util import run_python

SCRIPT = r"""
import json, sys
import numpy as np
import fastbn

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def peak_over_baseline(call):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    result = call()
    return status("VmHWM") - base, result

SHAPES = {"NCHW": ((64, 64, 112, 112), 1), "NHWC": ((64, 112, 112, 64), -1),
          "NxD": ((12544, 4096), 1)}
report = {}
for name, (shape, axis) in SHAPES.items():
    rng = np.random.default_rng(0)
    c = shape[axis]
    small = tuple(min(n, 9) for n in shape)
    fastbn.backward(*[np.ones(small, np.float32)] * 2, fastbn.forward(
        np.arange(np.prod(small), dtype=np.float32).reshape(small), axis=axis)[1], axis=axis)
    x = rng.standard_normal(shape, np.float32)
    dy = rng.standard_normal(shape, np.float32)
    gamma, beta, rm, rv = np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)
    kw = dict(axis=axis, running_mean=rm, running_var=rv)
    grown = {}
    grown["forward"], (y, stats) = peak_over_baseline(lambda: fastbn.forward(x, gamma, beta, **kw))
    del y
    grown["eval forward"], (y, _) = peak_over_baseline(
        lambda: fastbn.forward(x, gamma, beta, training=False, **kw))
    del y
    grown["backward"], (dx, _, _) = peak_over_baseline(
        lambda: fastbn.backward(dy, x, stats, gamma, axis=axis))
    del dx
    grown["forward, out=x"], _ = peak_over_baseline(
        lambda: fastbn.forward(x, gamma, beta, out=x, **kw))
    grown["backward, out=dy"], _ = peak_over_baseline(
        lambda: fastbn.backward(dy, x, stats, gamma, axis=axis, out=dy))
    report[name] = {"nbytes": x.nbytes, "grown": grown}
    del x, dy
print(json.dumps(report))
"""

LEAK_SCRIPT = r"""
import json
import numpy as np
import fastbn

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

rng = np.random.default_rng(0)
cases = [(rng.standard_normal((32, 16, 32, 32), np.float32), 1),
         (rng.standard_normal((512, 256)), 1), (rng.standard_normal((16, 8, 8, 24)), -1)]

def once():
    for x, axis in cases:
        c = x.shape[axis]
        rm, rv = np.zeros(c), np.ones(c)
        y, s = fastbn.forward(x, np.ones(c), np.zeros(c), axis=axis, running_mean=rm,
                              running_var=rv)
        fastbn.backward(y, x, s, np.ones(c), axis=axis)
        fastbn.forward(x, axis=axis, training=False, running_mean=rm, running_var=rv)

for _ in range(100):
    once()
before = rss()
for _ in range(1000):
    once()
print(json.dumps({"before": before, "after": rss()}))
"""


def _run(script):
    """The JSON that ``script`` prints last, run in a fresh interpreter."""
    return json.loads(run_python("-c", script, timeout=900).stdout.splitlines()[-1])


needs_proc = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                reason="needs Linux's /proc/self/clear_refs to reset the peak")


@needs_proc
@pytest.mark.default_blocks
def test_a_call_allocates_its_outputs_only():
    for layout, measured in _run(SCRIPT).items():
        nbytes = measured["nbytes"]  # about 200 MB
        for call, grown in measured["grown"].items():
            output = 0 if "out=" in call else nbytes
            # a temporary the size of x (or half of it) would be 100-200 MB over this bound
            assert grown <= output + nbytes // 16, (
                f"{layout} {call}: peak resident memory grew {grown / 1e6:.1f} MB for "
                f"{output / 1e6:.0f} MB of output")


@pytest.mark.default_blocks
def test_a_thousand_calls_do_not_grow_the_process():
    rss = _run(LEAK_SCRIPT)
    assert rss["after"] - rss["before"] < 1 << 20, rss
