"""Smoke test of the benchmark suite: ``pytest bench --bench-quick`` runs, and report.py tabulates it."""
import importlib.util
import json
import os

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
            for impl in ("fastbn", "numpy", "memcpy"):
                assert (op.name, layout.name, impl) in timed

    table = run_python("bench/report.py", str(results), timeout=60).stdout
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 9:
            rows[tuple(cells[:3])] = cells
    for op in OPS:
        for layout in LAYOUTS:
            cells = rows.get((op.name, layout.name, "x".join(map(str, layout.small))))
            assert cells is not None, f"no row for {op.name} {layout.name} in the report:\n{table}"
            ms, gb_per_s, times_memcpy, over_numpy = map(float, cells[3:7])
            assert min(ms, gb_per_s, times_memcpy, over_numpy) > 0, cells


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_check_rejects_a_wrong_result(op):
    spec = importlib.util.spec_from_file_location("bench_suite", os.path.join(ROOT, "bench",
                                                                              "test_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    layout = LAYOUTS[0]
    case = Case(layout, layout.small, np.float32, "cpu")
    result = op.numpy(case)()
    bench._check(result, case, op, "numpy")

    first = result[0] if isinstance(result, tuple) else result
    first.flat[0] += 0.05
    with pytest.raises(pytest.fail.Exception, match="differs from NumPy in float64"):
        bench._check(result, case, op, "numpy")
