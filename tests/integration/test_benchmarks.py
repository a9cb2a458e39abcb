"""The timing benchmarks still run end to end (slow tier): each starts its own server on the mini checkpoint and
must report a positive time for every configuration. No timing threshold is checked here; that is their output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_benchmark(script: str, tmp_path: Path, *arguments: str) -> dict:
    result_file = tmp_path / "result.json"
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--layout", "mini",
                                "--resolution", "64", "--steps", "3", "--repeats", "1", "--json", str(result_file),
                                *arguments], capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "goal" in completed.stdout
    return json.loads(result_file.read_text())


def test_training_benchmark_reports_every_configuration(tmp_path):
    result = run_benchmark("bench_training.py", tmp_path)
    assert set(result["seconds_per_step"]) == {"stock", "cidm", "cidm frozen tokens"}
    assert all(timing["wall"] > 0 for timing in result["seconds_per_step"].values())
    assert 0 < result["task_file_bytes"] < 1_000_000


def test_sampling_benchmark_reports_every_library_size(tmp_path):
    result = run_benchmark("bench_sampling.py", tmp_path, "--tasks", "1,2")
    assert set(result["seconds_per_step"]) == {"stock", "1 tasks", "2 tasks"}
    assert all(timing["wall"] > 0 for timing in result["seconds_per_step"].values())
