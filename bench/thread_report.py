"""Where the cores go in a NumPy training loop: each thread pool's CPU time and context switches.

Runs one loop of examples/training_loops.py with one kind of normalization layer and reads, for
every thread of the process, its CPU time and its voluntary and involuntary context switches
(Linux's /proc/self/task) before and after. Threads are told apart by when they appear: those
alive after ``import numpy`` are the main thread and NumPy's OpenBLAS pool, those that appear
while the data loads are other libraries' (SciPy's OpenBLAS, through scikit-learn), and those
that appear at fastbn's first call are Numba's workers (GNU OpenMP's, TBB's or workqueue's).

A pool whose workers burn CPU time while the loop's step is bound by something else is spinning:
its idle workers wait for work in a busy loop, on cores the other pool needs.

    python bench/thread_report.py --loop layernorm --norm fastbn [--steps 440]
    OMP_WAIT_POLICY=active python bench/thread_report.py --loop mlp   # the old default
"""
import argparse
import os
import sys
import time

import numpy as np  # noqa: F401  (starts OpenBLAS's pool)

_NUMPY_THREADS = {int(t) for t in os.listdir("/proc/self/task")}

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import training_loops  # noqa: E402


def thread_times():
    """``{tid: (cpu seconds, voluntary switches, involuntary switches)}`` of this process."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except FileNotFoundError:  # the thread ended
            continue
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        found[tid] = (cpu, int(status["voluntary_ctxt_switches"]),
                      int(status["nonvoluntary_ctxt_switches"]))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=list(training_loops.LOOPS), default="layernorm")
    parser.add_argument("--norm", choices=list(training_loops.NORMS), default="fastbn")
    parser.add_argument("--steps", type=int, default=440)
    args = parser.parse_args(argv)
    data = training_loops.load_digits_split(test_size=training_loops.TEST_SIZE)
    run = training_loops.Run(args.loop, args.norm, data)
    loaded = set(thread_times())
    run.steps(training_loops.EVAL_EVERY)  # compiles, and starts every pool the loop uses

    def pool(tid):
        if tid == os.getpid():
            return "main thread"
        if tid in _NUMPY_THREADS:
            return "NumPy's OpenBLAS"
        return "other libraries" if tid in loaded else "Numba's pool"

    before = thread_times()
    wall = time.perf_counter()
    train_seconds, norm_seconds = run.steps(args.steps)
    wall = time.perf_counter() - wall
    after = thread_times()
    totals = {}
    for tid, (cpu, vol, invol) in after.items():
        cpu0, vol0, invol0 = before.get(tid, (0.0, 0, 0))
        name = pool(tid)
        t = totals.setdefault(name, [0, 0.0, 0, 0])
        t[0] += 1
        t[1] += cpu - cpu0
        t[2] += vol - vol0
        t[3] += invol - invol0
    env = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in
                    ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_NUM_THREADS",
                     "NUMBA_NUM_THREADS"))
    import numba
    print(f"{args.loop} loop, {args.norm} layers, {args.steps} steps: {args.steps / train_seconds:,.0f} "
          f"training steps/s, normalization layers {norm_seconds / train_seconds:.0%} of the step; "
          f"{wall:.2f} s wall clock (evals included); {env}; Numba's threading layer "
          f"{numba.threading_layer() if args.norm == 'fastbn' else 'not started'}")
    print("| threads | count | CPU s | CPU / wall | voluntary switches | involuntary switches |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (count, cpu, vol, invol) in totals.items():
        print(f"| {name} | {count} | {cpu:.2f} | {cpu / wall:.0%} | {vol:,} | {invol:,} |")


if __name__ == "__main__":
    main()
