"""``python -m fastbn`` (fastbn/__main__.py), called in this process: the quick check by default,
the timing table with ``--bench``, exit status 1 when a check fails."""
import numpy as np
import pytest

import fastbn
import fastbn.__main__
from fastbn.cases import LAYOUTS, OPS

# As the command runs: default block sizes, so small shapes take the serial builds.
pytestmark = pytest.mark.default_blocks


def check_lines(out):
    """``{label: line}`` of the lines that report a check (the indented ones)."""
    return {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}


def test_default_checks_every_layout_quickly_without_timing(capsys):
    assert fastbn.__main__.main([]) == 0
    out = capsys.readouterr().out
    lines = check_lines(out)
    for layout in LAYOUTS:
        shape = "x".join(map(str, layout.small))
        assert shape in lines[layout.name] and lines[layout.name].endswith("ok"), out
    assert "  ok" in lines["BatchNorm"] and lines["layer_norm"].endswith("ok"), out
    assert "threading layer: " in out and "Numba's cache" in out, out
    assert out.rstrip().endswith("all ok") and "FAILED" not in out, out
    assert "| layout |" not in out, "the table is --bench's"


def test_bench_checks_and_prints_the_table(monkeypatch, capsys):
    small = [layout._replace(large=layout.small) for layout in LAYOUTS]
    monkeypatch.setattr(fastbn.__main__, "LAYOUTS", small)
    assert fastbn.__main__.main(["--bench", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "Times in ms (best of 1), float32, on the CPU" in out, out
    assert "| layout | shape | op | fastbn ms | x copy | GB/s | NumPy ms |" in out, out
    for layout in small:
        for op in OPS:
            assert f"| {layout.name} | {'x'.join(map(str, layout.small))} | {op.name} |" in out
    assert "FAILED" not in out, out


def test_repeat_implies_bench(monkeypatch, capsys):
    """``python -m fastbn --repeat N`` timed before --bench existed, and still does."""
    monkeypatch.setattr(fastbn.__main__, "LAYOUTS", [LAYOUTS[0]._replace(large=(64, 8))])
    assert fastbn.__main__.main(["--repeat", "1"]) == 0
    assert "| NxD | 64x8 | train fwd |" in capsys.readouterr().out


def test_a_wrong_result_fails_and_returns_1(monkeypatch, capsys):
    forward = fastbn.forward

    def off_by_a_little(*args, **kwargs):
        y, stats = forward(*args, **kwargs)
        y += 1e-3
        return y, stats

    monkeypatch.setattr(fastbn, "forward", off_by_a_little)  # the ops' calls, not the layer's
    assert fastbn.__main__.main([]) == 1
    captured = capsys.readouterr()
    lines = check_lines(captured.out)
    for layout in LAYOUTS:
        assert lines[layout.name].endswith("FAILED"), captured.out
    assert lines["layer_norm"].endswith("ok"), captured.out
    assert captured.out.rstrip().endswith("FAILED"), captured.out
    assert f"FAILED: fastbn disagrees with NumPy on {LAYOUTS[0].name}, " in captured.err


def test_a_nan_fails(monkeypatch, capsys):
    monkeypatch.setattr(fastbn.__main__, "_layer_norm_error", lambda dtype, device: np.nan)
    assert fastbn.__main__.main([]) == 1
    out = capsys.readouterr().out
    assert check_lines(out)["layer_norm"].endswith("nan  FAILED"), out


@pytest.mark.parametrize("repeat", ["0", "-1"])
def test_repeat_must_be_positive(repeat, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fastbn.__main__.main(["--bench", "--repeat", repeat])
    assert exit_info.value.code == 2
    assert f"--repeat must be at least 1, got {repeat}" in capsys.readouterr().err


def test_device_cuda_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(fastbn, "cuda_available", lambda: False)
    for argv in (["--device", "cuda"], ["--device", "cuda", "--bench"]):
        assert fastbn.__main__.main(argv) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == fastbn.__main__.NO_GPU + "\n"
