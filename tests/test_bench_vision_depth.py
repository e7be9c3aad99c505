"""`benchmarks/vision_depth.py`: the dead-layer benchmark's CPU path (tiny preset, seconds) and its arguments."""

import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("vision_depth", ROOT / "benchmarks" / "vision_depth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_on_the_tiny_preset_and_reports_ratios_of_one_run(tmp_path, capsys):
    out = tmp_path / "depth.json"
    assert _script().main(["--preset", "tiny", "--repeats", "2", "--warmup", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["vision_layers"] == 6 and report["layers_run_when_cut"] == 5
    times = report["times_ms"]
    assert list(times) == ["stock", "visionzip-64", "visionzip-64 full depth", "trim", "trim full depth"]
    assert all(len(row["runs"]) == 2 and row["min"] <= row["median"] <= row["max"] for row in times.values())
    for name in ("visionzip-64", "trim"):
        ratio = report["ratios"][name]
        assert ratio["vs_stock"] == pytest.approx(times[name]["median"] / times["stock"]["median"])
        assert ratio["vs_full_depth"] == pytest.approx(times[name]["median"] / times[f"{name} full depth"]["median"])
    assert len(report["load_average_1min"]) == 3  # every round, and the end
    printed = capsys.readouterr().out
    assert "| visionzip-64 full depth |" in printed and "| method | ours / stock |" in printed


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--warmup", "-1"]])
def test_bad_counts_exit_2_with_a_reason(argv, capsys):
    assert _script().main(["--preset", "tiny", *argv]) == 2
    assert "--repeats must be >= 1 and --warmup >= 0" in capsys.readouterr().err
