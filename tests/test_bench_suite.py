"""Smoke test of the benchmark suite: ``pytest bench --bench-quick`` runs, and report.py tabulates it."""
import importlib.util
import json
import os

import numba
import numpy as np
import pytest

from fastbn.cases import FAMILY, LAYOUTS, OPS, PEERS, Case

from _util import ROOT, run_python


def test_quick_run_and_report(tmp_path):
    results = tmp_path / "r.json"
    # Seconds with the Numba cache warm; a cold cache compiles every kernel first. The
    # normalization family's group has its own quick run (test_norms_quick_run_and_report).
    run_python("-m", "pytest", "bench", "--bench-quick", "--benchmark-only",
               "--ignore=bench/test_bench_norms.py", f"--benchmark-json={results}",
               "-p", "no:cacheprovider", "-q", timeout=300)
    timed = {(b["extra_info"]["op"], b["extra_info"]["layout"], b["extra_info"]["impl"])
             for b in json.loads(results.read_text())["benchmarks"]}
    for op in OPS:
        for layout in LAYOUTS:
            for impl in ("fastbn", "fastbn-new", "numpy", "memcpy", "copy"):
                assert (op.name, layout.name, impl) in timed
    # bench/test_bench_fused.py: BN + residual add + ReLU on the planar and channels-last layouts
    for op in ("fwd", "fwd+bwd"):
        for layout in ("NCHW", "NHWC"):
            for impl in ("fastbn-fused", "fastbn-unfused", "fastbn-plain", "memcpy", "copy"):
                assert (op, layout, impl) in timed

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

    # The fused op's own table, after the others: a row per op × layout, with its ratios.
    start = next(i for i, cells in enumerate(lines) if "fused ms" in map(str.strip, cells))
    header = [cell.strip() for cell in lines[start]]
    fused = {tuple(cell.strip() for cell in cells[:3]): dict(zip(header, map(str.strip, cells)))
             for cells in lines[start + 1:]}
    for op in ("fwd", "fwd+bwd"):
        for layout in LAYOUTS:
            if layout.name not in ("NCHW", "NHWC"):
                continue
            cells = fused.get((op, layout.name, "x".join(map(str, layout.small))))
            assert cells is not None, f"no fused row for {op} {layout.name}:\n{table}"
            figures = [float(cells[name]) for name in (
                "fused ms", "GB/s", "fused × copy", "unfused × copy", "plain BN × copy",
                "fused ÷ plain", "fused ÷ unfused")]
            assert min(figures) > 0, cells
            assert float(cells["fused ÷ plain"]) == pytest.approx(
                float(cells["fused × copy"]) / float(cells["plain BN × copy"]), rel=0.05), cells


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


def _fused_module(monkeypatch):
    """bench/test_bench_fused.py, imported as a module (it imports test_bench from bench/)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    path = os.path.join(ROOT, "bench", "test_bench_fused.py")
    spec = importlib.util.spec_from_file_location("bench_fused", path)
    fused = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fused)
    return fused


@pytest.mark.parametrize("op", ["fwd", "fwd+bwd"])
def test_fused_check_rejects_a_wrong_result(monkeypatch, op):
    """The fused group's check: the float64 reference in float32 passes; a wrong y, and a
    backward that misses the mask or the residual's gradient, fail."""
    fused = _fused_module(monkeypatch)
    layout = next(layout for layout in LAYOUTS if layout.name == "NCHW")
    c = fused.FusedCase(layout, layout.small, np.float32)
    good = tuple(a.astype(np.float32) for a in c.reference(op))
    fused._check(good, c, op, "fastbn-fused")
    wrong = [good[0].copy()]
    wrong[0].flat[np.argmax(good[0])] += 0.05
    with pytest.raises(pytest.fail.Exception, match="y differs from NumPy in float64"):
        fused._check((*wrong, *good[1:]), c, op, "fastbn-fused")
    if op == "fwd+bwd":
        dy = c.dy.astype(np.float64)
        unmasked = (dy,) + tuple(a.astype(np.float32) for a in c.reference(op, plain=True)[1:])
        masked = c.reference(op)[4]
        assert (masked == 0).any() and (masked != dy).any()
        with pytest.raises(pytest.fail.Exception, match="dx differs"):  # the mask ignored
            fused._check((good[0], *unmasked[1:], good[4]), c, op, "fastbn-fused")
        with pytest.raises(pytest.fail.Exception, match="dresidual differs"):
            fused._check((*good[:4], c.dy), c, op, "fastbn-fused")
        # plain batch norm is checked against its own reference
        plain = tuple(a.astype(np.float32) for a in c.reference(op, plain=True))
        fused._check(plain, c, op, "fastbn-plain")


def test_fused_check_takes_either_side_of_the_relu_kink(monkeypatch):
    """Where the ReLU's input is within rounding of 0, a result's mask may differ from the
    float64 one's: its backward is checked against the reference with its own mask."""
    fused = _fused_module(monkeypatch)
    layout = next(layout for layout in LAYOUTS if layout.name == "NCHW")
    c = fused.FusedCase(layout, layout.small, np.float32)
    reference = c.reference("fwd+bwd")
    k = int(np.argmin(np.abs(c.pre) + (c.pre <= 0) * 1e9))  # the smallest positive input
    c.pre.flat[k] = 1e-7  # as if it had been within rounding of 0
    y = reference[0].astype(np.float32)
    y.flat[k] = 0  # this result's ReLU put it on the other side
    ours = tuple(a.astype(np.float32) for a in c.reference("fwd+bwd", mask=y > 0))
    fused._check((y, *ours[1:]), c, "fwd+bwd", "fastbn-fused")
    c.pre.flat[k] = 0.5  # far from the kink: the same result is wrong
    with pytest.raises(pytest.fail.Exception, match="differs from NumPy in float64"):
        fused._check((y, *ours[1:]), c, "fwd+bwd", "fastbn-fused")


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay.name in ("NCHW", "NHWC")],
                         ids=lambda layout: layout.name)
def test_fused_reference_remasked_is_the_reference_with_that_mask(monkeypatch, layout):
    """The check's shortcut for a result whose mask differs at a few elements gives the
    reference computed again with that mask."""
    fused = _fused_module(monkeypatch)
    c = fused.FusedCase(layout, layout.small, np.float32)
    expected = c.reference("fwd+bwd")
    mask = expected[0] > 0
    flat = mask.reshape(-1)
    flat[[0, 5, flat.size // 2, flat.size - 1]] ^= True  # some channels twice, some once
    for fast, full in zip(c.remasked(expected, mask), c.reference("fwd+bwd", mask=mask)):
        np.testing.assert_allclose(fast, full, rtol=1e-12, atol=1e-12)
    assert not np.allclose(c.remasked(expected, mask)[1], expected[1])


# -- bench/test_bench_norms.py: the normalization family ----------------------------------------


def test_norms_quick_run_and_report(tmp_path):
    """The family's group on each op's small shape: fastbn, the copies and the peers timed, and
    report.py's table of it, a row per op × pass with its ratios."""
    results = tmp_path / "r.json"
    run_python("-m", "pytest", "bench/test_bench_norms.py", "--bench-quick", "--benchmark-only",
               f"--benchmark-json={results}", "-p", "no:cacheprovider", "-q", timeout=300)
    benchmarks = json.loads(results.read_text())["benchmarks"]
    timed = {(b["extra_info"]["norm"], b["extra_info"]["op"], b["extra_info"]["impl"])
             for b in benchmarks}
    for norm in FAMILY:
        for op in ("fwd", "bwd"):
            for impl in ("fastbn", "memcpy", "copy"):
                assert (norm.name, op, impl) in timed
    torch = importlib.util.find_spec("torch") is not None
    if torch:  # PyTorch's results pass the check
        assert all(b["extra_info"]["valid"] for b in benchmarks
                   if b["extra_info"]["impl"] == "torch")

    table = run_python("bench/report.py", str(results), timeout=60).stdout
    lines = [[cell.strip() for cell in line.strip().strip("|").split("|")]
             for line in table.splitlines() if line.startswith("| ")]
    header = lines[0]
    assert header[:6] == ["op", "pass", "shape", "fastbn ms", "GB/s", "fastbn × copy"], table
    rows = {tuple(cells[:3]): dict(zip(header, cells)) for cells in lines[1:]}
    assert len(rows) == 2 * len(FAMILY), table
    for norm in FAMILY:
        for op in ("fwd", "bwd"):
            cells = rows.get((norm.name, op, "x".join(map(str, norm.small))))
            assert cells is not None, f"no row for {norm.name} {op}:\n{table}"
            figures = [float(cells[name]) for name in ("fastbn ms", "GB/s", "fastbn × copy")]
            if torch:
                figures.append(float(cells["PyTorch ÷ fastbn"]))
            assert min(figures) > 0, cells
            assert cells["copy"] in ("np.copyto", f"{numba.get_num_threads()} threads")


def _norms_module(monkeypatch):
    """bench/test_bench_norms.py, imported as a module (it imports test_bench from bench/)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    path = os.path.join(ROOT, "bench", "test_bench_norms.py")
    spec = importlib.util.spec_from_file_location("bench_norms", path)
    norms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(norms)
    return norms


@pytest.mark.parametrize("op", ["fwd", "bwd"])
@pytest.mark.parametrize("norm", FAMILY, ids=lambda norm: norm.function)
def test_norm_check_rejects_a_wrong_result(monkeypatch, norm, op):
    """The family's check: the float64 reference rounded to float32 passes; a wrong output, a
    missing or an extra one fail fastbn's benchmark and flag a peer's."""
    norms = _norms_module(monkeypatch)
    c = norms.CheckedCase(norm, norm.small, np.float32)
    good = tuple(a.astype(np.float32) for a in c.reference(op))
    assert len(good) == len(norm.outputs(op == "bwd"))
    assert norms._check(good, c, op, "fastbn") is None
    for k, name in enumerate(norm.outputs(op == "bwd")):
        wrong = list(good)
        wrong[k] = good[k].copy()
        wrong[k].flat[np.argmax(np.abs(good[k]))] *= 1.01
        with pytest.raises(pytest.fail.Exception, match=f"{name} differs from the float64"):
            norms._check(tuple(wrong), c, op, "fastbn")
        assert f"{name} differs" in norms._check(tuple(wrong), c, op, PEERS[0])
    with pytest.raises(pytest.fail.Exception, match="outputs, expected"):
        norms._check(good + good[-1:], c, op, "fastbn")
    with pytest.raises(pytest.fail.Exception, match="has shape"):
        norms._check((good[0][:1], *good[1:]), c, op, "fastbn")


@pytest.mark.parametrize("norm", FAMILY, ids=lambda norm: norm.function)
def test_norm_reference_in_pieces_is_the_whole(monkeypatch, norm):
    """The group's reference, computed piece by piece along x's first axis to bound its memory,
    is tests/reference.py's on the whole tensor."""
    norms = _norms_module(monkeypatch)
    c = norms.CheckedCase(norm, norm.small, np.float32)
    kind, groups = ("group", norm.view(c.x.shape)[1]) if norm.channels else ("layer", 1)
    y, mean, _, invstd = norms.reference.normalize(
        c.x, kind, norms.EPS, c.case.gamma, c.case.beta, groups=groups, centred=norm.centred)
    grads = norms.reference.normalize_backward(c.case.dy, c.x, mean, invstd, kind, c.case.gamma,
                                               groups=groups)
    monkeypatch.setattr(norms, "REFERENCE_PIECE", 1)  # a piece per index of the first axis
    assert len(c._pieces()) == c.x.shape[0] > 1
    np.testing.assert_allclose(c.reference("fwd")[0], y, rtol=1e-13, atol=1e-13)
    backward = c.reference("bwd")
    assert len(backward) == (3 if norm.centred else 2)
    for ours, whole in zip(backward, grads):
        np.testing.assert_allclose(ours, whole, rtol=1e-12, atol=1e-12)
