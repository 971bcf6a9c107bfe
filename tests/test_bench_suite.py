"""Smoke test of the benchmark suite: ``pytest bench --bench-quick`` runs, and report.py tabulates it."""
import importlib.util
import json
import os

import numba
import numpy as np
import pytest

from fastbn.cases import LAYOUTS, OPS, Case

from _util import ROOT, run_python


def test_quick_run_and_report(tmp_path):
    results = tmp_path / "r.json"
    # Seconds with the Numba cache warm; a cold cache compiles every kernel first.
    run_python("-m", "pytest", "bench", "--bench-quick", "--benchmark-only",
               f"--benchmark-json={results}", "-p", "no:cacheprovider", "-q", timeout=300)
    timed = {(b["extra_info"]["op"], b["extra_info"]["layout"], b["extra_info"]["impl"])
             for b in json.loads(results.read_text())["benchmarks"]}
    for op in OPS:
        for layout in LAYOUTS:
            for impl in ("fastbn", "fastbn-new", "numpy", "memcpy", "copy"):
                assert (op.name, layout.name, impl) in timed

    table = run_python("bench/report.py", str(results), timeout=60).stdout
    lines = [line.strip().strip("|").split("|") for line in table.splitlines()
             if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0]]
    assert header[:3] == ["op", "layout", "shape"], table
    rows = {tuple(cell.strip() for cell in cells[:3]): dict(zip(header, map(str.strip, cells)))
            for cells in lines[1:]}
    for op in OPS:
        for layout in LAYOUTS:
            cells = rows.get((op.name, layout.name, "x".join(map(str, layout.small))))
            assert cells is not None, f"no row for {op.name} {layout.name} in the report:\n{table}"
            figures = [float(cells[name]) for name in (
                "fastbn ms", "GB/s", "fastbn × copy", "fastbn, new output × copy",
                "NumPy × copy")]
            assert min(figures) > 0, cells
            assert cells["copy"] in ("np.copyto", "2 threads", f"{numba.get_num_threads()} threads")


def _bench_module():
    """bench/test_bench.py, imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_suite", os.path.join(ROOT, "bench",
                                                                              "test_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_check_rejects_a_wrong_result(op):
    bench = _bench_module()
    layout = LAYOUTS[0]
    case = Case(layout, layout.small, np.float32, "cpu")
    result = op.numpy(case)()
    bench._check(result, case, op, "numpy")

    first = result[0] if isinstance(result, tuple) else result
    first.flat[0] += 0.05
    with pytest.raises(pytest.fail.Exception, match="differs from NumPy in float64"):
        bench._check(result, case, op, "numpy")


def test_a_peers_wrong_result_is_flagged_not_failed():
    """A peer's result that fails the check is timed all the same, with the problem recorded."""
    bench = _bench_module()
    op, layout = OPS[0], LAYOUTS[0]
    case = Case(layout, layout.small, np.float32, "cpu")
    result = op.numpy(case)()
    assert bench._check(result, case, op, "jax") is None
    result.flat[0] += 0.05
    assert "differs from NumPy in float64" in bench._check(result, case, op, "jax")
