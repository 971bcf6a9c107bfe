"""The training-loop group: steps per second of four NumPy training loops, with fastbn's layers
and with plain NumPy ones, in three thread settings.

Each setting runs ``examples/training_loops.py`` in a fresh process, since the variables must be
set before NumPy and Numba start their thread pools:

- ``default``: nothing set (NumPy's OpenBLAS and Numba each use every core);
- ``OPENBLAS_NUM_THREADS=1``: NumPy's matrix products on the calling thread;
- ``NUMBA_NUM_THREADS=1``: fastbn on the calling thread.

Within a process the two kinds of layer alternate, round by round, from the same weights on the
same batches, so both see the same state of the machine; each keeps its fastest round.

    python bench/loops.py [--steps 440] [--rounds 5] [--markdown bench/results/loops-float32.md]
    python bench/loops.py --baseline /path/to/other/checkout   # the same loops on another fastbn

``--baseline`` runs each setting a second time with another checkout's ``fastbn`` first on the
Python path (an earlier commit, say), alternating with this one, and adds its columns.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPS_SCRIPT = os.path.join(ROOT, "examples", "training_loops.py")
SETTINGS = {
    "default": {},
    "OPENBLAS_NUM_THREADS=1": {"OPENBLAS_NUM_THREADS": "1"},
    "NUMBA_NUM_THREADS=1": {"NUMBA_NUM_THREADS": "1"},
}
# Variables that would change what a setting measures: they are removed from each run's
# environment, so that "default" is NumPy's and Numba's own defaults.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def run_setting(setting, steps, rounds, loops, fastbn_path=ROOT):
    """One process of the loops under ``setting``, with ``fastbn`` imported from
    ``fastbn_path``; its JSON results."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(SETTINGS[setting])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [fastbn_path, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "loops.json")
        subprocess.run([sys.executable, LOOPS_SCRIPT, "--steps", str(steps), "--rounds",
                        str(rounds), "--json", path, "--loop", *loops],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            return json.load(f)


def table(results, baseline=None):
    """A markdown table: for each loop and setting, steps/s with fastbn and with NumPy layers,
    the speed-up, and the normalization layers' µs per step with each."""
    head = ["loop", "setting", "fastbn steps/s", "NumPy steps/s", "speed-up",
            "fastbn norm µs/step (share)", "NumPy norm µs/step (share)", "norm time, NumPy/fastbn"]
    if baseline:
        head[3:3] = ["baseline fastbn steps/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    loops = next(iter(results.values()))["loops"]
    for loop in loops:
        for setting, result in results.items():
            f, n = result["loops"][loop]["fastbn"], result["loops"][loop]["numpy"]
            cells = [loop, setting, f"{f['steps_per_s']:,.0f}", f"{n['steps_per_s']:,.0f}",
                     f"{f['steps_per_s'] / n['steps_per_s']:.2f}x",
                     f"{f['norm_us_per_step']:.0f} ({f['share']:.0%})",
                     f"{n['norm_us_per_step']:.0f} ({n['share']:.0%})",
                     f"{n['norm_us_per_step'] / f['norm_us_per_step']:.1f}x"]
            if baseline:
                cells[3:3] = [f"{baseline[setting]['loops'][loop]['fastbn']['steps_per_s']:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=440, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per kind of layer")
    parser.add_argument("--loop", nargs="+", default=["mlp", "conv", "layernorm", "residual"])
    parser.add_argument("--setting", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--baseline", help="another checkout whose fastbn to run alongside")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    results, baseline = {}, {} if args.baseline else None
    for setting in args.setting:
        results[setting] = run_setting(setting, args.steps, args.rounds, args.loop)
        if args.baseline:
            baseline[setting] = run_setting(setting, args.steps, args.rounds, args.loop,
                                            os.path.abspath(args.baseline))
        print(f"{setting}: done", file=sys.stderr, flush=True)
    text = (f"Training steps per second (best of {args.rounds} rounds of {args.steps} steps; an "
            f"eval on the test set every 22 steps, untimed), {os.cpu_count()} CPUs\n\n"
            + table(results, baseline))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
