"""Turn the JSON of ``pytest bench --benchmark-json=FILE`` into a markdown table and a PNG chart.

    python bench/report.py RESULTS.json [--markdown OUT.md] [--png OUT.png]

The table goes to stdout (and to ``--markdown``); matplotlib is needed for ``--png`` only.
"""
import argparse
import json
import os
import sys

from fastbn._peers import LABELS as PEER_LABELS
from fastbn.cases import OPS as _OPS

OPS = tuple(op.name for op in _OPS)
# What the table and the chart show, each as its time over the yardstick's.
LABELS = {"fastbn": "fastbn", "fastbn-new": "fastbn, new output", "numpy": "NumPy",
          **PEER_LABELS, "streaming-copy": "streaming copy"}
PEERS = tuple(PEER_LABELS)
COPIES = ("memcpy", "copy")  # np.copyto; a copy on Numba's threads
# The fused op's benchmarks (bench/test_bench_fused.py): its ops, and its implementations' columns.
FUSED_OPS = ("fwd", "fwd+bwd")
FUSED_LABELS = {"fastbn-fused": "fused", "fastbn-unfused": "unfused", "torch": "PyTorch",
                "fastbn-plain": "plain BN"}
NONE = "–"
# The normalization family's benchmarks (bench/test_bench_norms.py): its passes.
NORM_OPS = ("fwd", "bwd")
FLAG = "*"  # after a peer's figure: its result failed the check against NumPy in float64


def load(path):
    """``(results, times, nbytes, latency, invalid, fused, norms)``: the JSON; per bandwidth group
    ``(op, layout, shape)`` the fastest time of each implementation in seconds and the bytes the
    op moves, in table order; per latency group ``(layout, shape, op)`` each implementation's
    median time in seconds, in the order of the run; the ``(group, implementation)`` pairs whose
    result failed the check (peers only: they are timed all the same); per group of the fused
    op (``bench/test_bench_fused.py``) ``(op, layout, shape)``, ``{"bytes": the bytes it moves,
    implementation: its fastest time}``, in the order of the run; per group of the normalization
    family (``bench/test_bench_norms.py``) ``(op, pass, shape)``, the same, and ``"invalid"``: the
    implementations whose result failed the check, in the order of the run."""
    with open(path) as f:
        results = json.load(f)
    times, nbytes, latency, invalid, fused, norms = {}, {}, {}, set(), {}, {}
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        if info.get("kind") == "latency":
            key = info["layout"], info["shape"], info["op"]
            latency.setdefault(key, {})[info["impl"]] = bench["stats"]["median"]
            continue
        if info.get("kind") == "fused":
            group = fused.setdefault((info["op"], info["layout"], info["shape"]),
                                     {"bytes": info["bytes"]})
            group[info["impl"]] = bench["stats"]["min"]
            continue
        if info.get("kind") == "norm":
            group = norms.setdefault((info["norm"], info["op"], info["shape"]),
                                     {"bytes": info["bytes"], "invalid": set()})
            group[info["impl"]] = bench["stats"]["min"]
            if info.get("valid") is False:
                group["invalid"].add(info["impl"])
            continue
        key = info["op"], info["layout"], info["shape"]
        times.setdefault(key, {})[info["impl"]] = bench["stats"]["min"]
        nbytes[key] = info["bytes"]
        if info.get("valid") is False:
            invalid.add((key, info["impl"]))
    # By op, then in the order of the run (layouts and shapes as fastbn.cases lists them).
    order = sorted(times, key=lambda key: OPS.index(key[0]) if key[0] in OPS else len(OPS))
    fused = dict(sorted(fused.items(), key=lambda item: FUSED_OPS.index(item[0][0])
                        if item[0][0] in FUSED_OPS else len(FUSED_OPS)))
    return results, {key: times[key] for key in order}, nbytes, latency, invalid, fused, norms


def yardstick(impls):
    """The time of the fastest plain copy in a group (np.copyto or the threaded copy), or None."""
    copies = [impls[name] for name in COPIES if name in impls]
    return min(copies) if copies else None


def _number(value):
    if value < 0.01:
        return f"{value:.1g}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _ratio(a, b):
    return _number(a / b) if a is not None and b is not None else NONE


def _ms(seconds):
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def describe(results):
    """The lines that say what ran where: versions, machine, date, commit, command."""
    machine = results.get("machine_info", {})
    cpu = machine.get("cpu", {})
    commit = results.get("commit_info") or {}
    dtype = results.get("dtype") or next(
        (b["extra_info"].get("dtype") for b in results["benchmarks"]), "?")
    versions = [f"fastbn {machine.get('fastbn', '?')}", f"NumPy {machine.get('numpy', '?')}",
                f"Numba {machine.get('numba', '?')} ({machine.get('threads', '?')} threads, "
                f"{machine.get('threading_layer') or '?'} layer)"]
    versions += [f"{LABELS[name]} {machine[name]}" for name in PEERS if machine.get(name)]
    where = [f"{cpu.get('brand_raw', machine.get('machine', '?'))}, "
             f"{cpu.get('count', '?')} cores", f"{machine.get('system', '?')}, "
             f"Python {machine.get('python_version', '?')}",
             results.get("datetime", "?")[:16].replace("T", " ") + " UTC"]
    if commit.get("id"):
        where.append(f"commit {commit['id'][:10]}{' (dirty)' if commit.get('dirty') else ''}")
    lines = [f"**fastbn benchmarks, {dtype}**: {', '.join(versions)}; {'; '.join(where)}."]
    if results.get("command"):
        lines.append(f"Command: `{results['command']}`.")
    return lines


def markdown(results, times, nbytes, invalid=frozenset()):
    """The report: a description of the run, then one table row per group."""
    shown = [impl for impl in LABELS if any(impl in impls for impls in times.values())]
    peers = [impl for impl in shown if impl in PEERS]
    threads = results.get("machine_info", {}).get("threads", "?")
    lines = describe(results) + [
        "",
        f"Times are the minimum over each benchmark's rounds: the least disturbed by other work "
        f"on the machine. × copy: time over that of the fastest plain copy of the same tensor "
        f"(the faster of `np.copyto` and a copy on Numba's {threads} threads; which one in the "
        f"last column); streaming copy: the same copy with the streaming stores that fastbn's "
        f"maps use on outputs larger than the cache, not part of the yardstick. fastbn writes "
        f"into a used array (`out=`); \"new output\": without "
        f"`out=`, so that each call allocates its result and touches its pages for the first "
        f"time. GB/s: the bytes fastbn must move at the least (x and y forward; dy, x and dx "
        f"backward) over its time. Best peer ÷ fastbn: how many times faster fastbn is than the "
        f"fastest peer. {FLAG}: that result failed the check against NumPy in float64 (timed "
        f"all the same); –: not installed, or no such op.",
        "",
        "| op | layout | shape | fastbn ms | GB/s | " + " | ".join(
            f"{LABELS[impl]} × copy" for impl in shown) + " | best peer ÷ fastbn | copy |",
        "|---|---|---|" + "---:|" * (len(shown) + 4),
    ]
    for key, impls in times.items():
        ours, copy = impls.get("fastbn"), yardstick(impls)
        cells = [*key, _ms(ours) if ours is not None else NONE,
                 _number(nbytes[key] / ours / 1e9) if ours is not None else NONE]
        for impl in shown:
            flag = FLAG if (key, impl) in invalid else ""
            cells.append(_ratio(impls.get(impl), copy) + (flag if impl in impls else ""))
        best = min((impls[impl] for impl in peers if impl in impls), default=None)
        cells.append(_ratio(best, ours))
        faster = min((name for name in COPIES if name in impls), key=impls.get, default=None)
        cells.append({"memcpy": "np.copyto", "copy": f"{threads} threads"}.get(faster, NONE))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _us(seconds):
    return _number(seconds * 1e6) if seconds is not None else NONE


def latency_markdown(latency):
    """The latency table: median µs per call on the trainer shapes."""
    lines = [
        "Latency on the small tensors NumPy trainers use: the median time of a call, in µs "
        "(fastbn without `out=`, as a training loop calls it; layer step: a layer's forward and "
        "backward in training mode). NumPy ÷ fastbn, PyTorch ÷ fastbn: how many times faster "
        "fastbn is.",
        "",
        "| layout | shape | op | fastbn µs | NumPy µs | PyTorch µs | NumPy ÷ fastbn "
        "| PyTorch ÷ fastbn |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, impls in latency.items():
        ours = impls.get("fastbn")
        cells = [*key, _us(ours), _us(impls.get("numpy")), _us(impls.get("torch")),
                 _ratio(impls.get("numpy"), ours), _ratio(impls.get("torch"), ours)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fused_markdown(fused, threads="?"):
    """The table of the fused op, BN + residual add + ReLU: one row per group."""
    lines = [
        ("Batch norm fused with a residual add and a ReLU, `y = relu(BN(x) + r)`, in training "
        "(`bench/test_bench_fused.py`): fwd is the forward; fwd+bwd the forward, then the backward "
        "with the ReLU's mask that also returns the residual's gradient. fused: "
        "`fastbn.forward(..., residual=r, activation=\"relu\")` and `fastbn.backward(..., "
        "activation=\"relu\", y=y, dresidual=...)`; unfused: fastbn's plain batch norm with "
        "the add, the ReLU and the mask in NumPy; PyTorch: its eager ATen ops (batch norm, "
        "`add_`, `relu_`; `threshold_backward`, batch norm's backward); plain BN: fastbn's "
        "batch norm alone on the same tensor, without the add or the ReLU. Times are the "
        "minimum over each benchmark's rounds. × copy: time over that of the fastest plain "
        f"copy of x (the faster of `np.copyto` and a copy on Numba's {threads} threads). GB/s: "
        "the bytes the fused op must move at the least (forward: x, r, y; backward: dy, x, y, "
        "dx, dr) over its time. fused ÷ plain: what the fusion costs over batch norm alone "
        "(the goal: 1.15 at most); fused ÷ unfused, fused ÷ PyTorch: under 1 where fused is "
        "faster."),
        "",
        "| op | layout | shape | fused ms | GB/s | " + " | ".join(
            f"{label} × copy" for label in FUSED_LABELS.values())
        + " | fused ÷ plain | fused ÷ unfused | fused ÷ PyTorch | copy |",
        "|---|---|---|" + "---:|" * (len(FUSED_LABELS) + 6),
    ]
    for key, impls in fused.items():
        ours, copy = impls.get("fastbn-fused"), yardstick(impls)
        cells = [*key, _ms(ours) if ours is not None else NONE,
                 _number(impls["bytes"] / ours / 1e9) if ours is not None else NONE]
        cells += [_ratio(impls.get(impl), copy) for impl in FUSED_LABELS]
        cells += [_ratio(ours, impls.get(impl))
                  for impl in ("fastbn-plain", "fastbn-unfused", "torch")]
        faster = min((name for name in COPIES if name in impls), key=impls.get, default=None)
        cells.append({"memcpy": "np.copyto", "copy": f"{threads} threads"}.get(faster, NONE))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def norm_markdown(norms, threads="?"):
    """The table of the normalization family: one row per op × pass × shape."""
    peers = [name for name in PEERS if any(name in impls for impls in norms.values())]
    lines = [
        ("The normalization family (`bench/test_bench_norms.py`): layer and RMS norm over the "
         "last axis, group norm (G = 32) and instance norm over N×C×H×W; fwd is the forward "
         "(training statistics), bwd the backward given the forward's statistics "
         "(`fastbn.layer_norm_backward`, ...). fastbn writes into used arrays (`out=`). "
         "Peers: PyTorch's eager ops (`torch.nn.functional`; the backward: its ATen gradient "
         "ops for layer and group norm, autograd for instance and RMS norm), JAX and "
         "TensorFlow the op written from their array ops (jitted, `tf.function`; the backward "
         "from the saved statistics), ONNX Runtime the op's ONNX operator (forward only). "
         "Times are the minimum over each benchmark's rounds. × copy: time over that of the "
         f"fastest plain copy of x (the faster of `np.copyto` and a copy on Numba's {threads} "
         "threads). GB/s: the bytes the pass must move at the least (x and y; dy, x and dx) "
         "over fastbn's time. *peer* ÷ fastbn: how many times faster fastbn is than that peer. "
         f"{FLAG}: that result failed the check against the float64 reference (timed all the "
         "same); –: not installed, or no such pass."),
        "",
        "| " + " | ".join(["op", "pass", "shape", "fastbn ms", "GB/s", "fastbn × copy",
                           *(f"{LABELS[name]} ÷ fastbn" for name in peers), "copy"]) + " |",
        "|---|---|---|" + "---:|" * (len(peers) + 4),
    ]
    for key, impls in norms.items():
        ours, copy = impls.get("fastbn"), yardstick(impls)
        cells = [*key, _ms(ours) if ours is not None else NONE,
                 _number(impls["bytes"] / ours / 1e9) if ours is not None else NONE,
                 _ratio(ours, copy)]
        cells += [_ratio(impls.get(name), ours) + (FLAG if name in impls["invalid"] else "")
                  for name in peers]
        faster = min((name for name in COPIES if name in impls), key=impls.get, default=None)
        cells.append({"memcpy": "np.copyto", "copy": f"{threads} threads"}.get(faster, NONE))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(results, times, path, invalid=frozenset()):
    """Each implementation's time as a multiple of the fastest copy's, a bar per group, into
    ``path``."""
    try:
        import matplotlib
    except ImportError:
        sys.exit('report.py: --png needs matplotlib; install it with: pip install -e ".[bench]"')
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    keys = [key for key in times if yardstick(times[key]) is not None]
    impls = [impl for impl in LABELS if any(impl in times[key] for key in keys)]
    height = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.2 * len(keys) * len(impls)))
    for i, impl in enumerate(impls):
        rows = [row for row, key in enumerate(keys) if impl in times[key]]
        ratios = [times[keys[row]][impl] / yardstick(times[keys[row]]) for row in rows]
        bars = ax.barh([row + (i - (len(impls) - 1) / 2) * height for row in rows], ratios,
                       height, label=LABELS[impl])
        ax.bar_label(bars, [_number(ratio) + (FLAG if (keys[row], impl) in invalid else "")
                            for row, ratio in zip(rows, ratios)], padding=2, fontsize=7)
    ax.axvline(1, color="black", linewidth=1, linestyle="--", label="fastest copy", zorder=0)
    ax.set_xscale("log")
    widths = [bar.get_width() for bar in ax.patches]
    ax.set_xlim(min(0.5, min(widths) / 1.5), 2 * max(widths))  # room for the labels
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_yticks(range(len(keys)), [" · ".join(key) for key in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"time ÷ time of the fastest plain copy of the same tensor (log scale; lower "
                  f"is faster; {FLAG}: failed the check)")
    machine = results.get("machine_info", {})
    ax.set_title(f"fastbn, {results.get('dtype', '')}, {machine.get('threads', '?')} threads, "
                 f"{machine.get('cpu', {}).get('brand_raw', '')}", fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="the JSON of pytest bench --benchmark-json=RESULTS.json")
    parser.add_argument("--markdown", metavar="OUT.md", help="also write the table here")
    parser.add_argument("--png", metavar="OUT.png", help="draw the chart here (needs matplotlib)")
    args = parser.parse_args(argv)

    results, times, nbytes, latency, invalid, fused, norms = load(args.results)
    if not (times or latency or fused or norms):
        parser.error(f"{args.results} holds no benchmarks (was it run with --benchmark-disable?)")
    text = (markdown(results, times, nbytes, invalid) if times else
            "\n".join(describe(results)) + "\n")
    if latency:
        text += "\n" + latency_markdown(latency)
    if fused:
        threads = results.get("machine_info", {}).get("threads", "?")
        text += "\n" + fused_markdown(fused, threads)
    if norms:
        threads = results.get("machine_info", {}).get("threads", "?")
        text += "\n" + norm_markdown(norms, threads)
    if args.png and times:
        chart(results, times, args.png, invalid)
        if args.markdown:
            image = os.path.relpath(args.png, os.path.dirname(os.path.abspath(args.markdown)))
            text += (f"\n![Each implementation's time as a multiple of the fastest copy's]"
                     f"({image})\n")
    sys.stdout.write(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
