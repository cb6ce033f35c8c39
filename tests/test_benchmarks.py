"""The speed benchmarks keep working: each runs in its ``--smoke`` mode (a few CPU steps) as a
user would run it, and prints its table. Not timed tests: no speed is asserted."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from conftest import REPO


def run_benchmark(script: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}  # --smoke stays on the CPU anyway
    process = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke"], cwd=REPO, capture_output=True, text=True, timeout=180, env=env
    )
    assert process.returncode == 0, f"{script} --smoke failed:\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    return process.stdout


def table(stdout: str) -> list[dict[str, str]]:
    """The Markdown table a benchmark prints, as one dict per row."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, f"no table in:\n{stdout}"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def positive(value: str) -> bool:
    number = float(value.split()[0])
    return math.isfinite(number) and number > 0


def test_overhead_smoke():
    rows = table(run_benchmark("overhead.py"))
    assert [row["model"] for row in rows] == ["unet", "lraspp_mobilenet_v3_large"]
    for row in rows:
        assert all(positive(row[key]) for key in ("plain steps/s", "segtrain steps/s", "ratio (wall)", "ratio (CPU)")), row
        assert row[">= 0.97"] in ("yes", "no")


def test_gpu_smoke_runs_the_cpu_code_path():
    stdout = run_benchmark("gpu.py")
    assert "no CUDA or --smoke" in stdout
    rows = table(stdout)
    assert [(row["model"], row["switches"]) for row in rows] == [
        ("unet", "fp32"), ("unet", "bf16 + channels_last"), ("deeplabv3_resnet50", "fp32")
    ]
    for row in rows:
        assert positive(row["plain img/s"]) and positive(row["segtrain img/s"]) and positive(row["ratio"]), row
        assert row["peak memory GB"] == "n/a (CPU)"


def test_scaling_smoke():
    rows = table(run_benchmark("scaling.py"))
    assert [(row["sweep"], row["size"], row["train"]) for row in rows] == [
        ("image size", "16x16", "8"), ("image size", "32x32", "8"), ("samples", "32x32", "8"), ("samples", "32x32", "32")
    ]
    for row in rows:
        assert positive(row["epoch s (median 2..N)"]) and positive(row["last / 2nd epoch"]), row
    assert [row["work x"] for row in rows] == ["1", "4", "1", "4"]


@pytest.mark.slow  # the CUDA tests dry-run on the CPU: a few train.py runs
def test_gpu_check_smoke_writes_its_results(tmp_path):
    """benchmarks/gpu_check.sh --smoke: the GPU check's steps on the CPU, its files under $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"], cwd=REPO, capture_output=True, text=True, timeout=900, env=env
    )
    assert process.returncode == 0, process.stdout[-5000:] + process.stderr[-3000:]
    assert {"versions.txt", "nvidia-smi.txt", "pytest.txt", "gpu_table.md", "summary.txt"} <= {p.name for p in tmp_path.iterdir()}
    assert "torch:" in (tmp_path / "versions.txt").read_text()
    pytest_summary = (tmp_path / "pytest.txt").read_text().splitlines()[-1]
    assert " passed" in pytest_summary and "failed" not in pytest_summary
    assert "PASSED tests/test_cuda.py::test_every_loss_on_the_device_equals_its_cpu_value_and_gradient" in (tmp_path / "pytest.txt").read_text()
    rows = table((tmp_path / "gpu_table.md").read_text())
    assert [row["model"] for row in rows] == ["unet", "unet", "deeplabv3_resnet50"]
    assert "gpu_check:" in (tmp_path / "summary.txt").read_text()


def test_export_smoke():
    pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")
    rows = table(run_benchmark("export.py"))
    assert [row["model"] for row in rows] == ["unet"]
    assert rows[0]["check passed"] == "yes" and rows[0]["fixed axes"] == "none"
    assert positive(rows[0]["torch ms"]) and positive(rows[0]["onnxruntime ms"])


@pytest.mark.slow  # both sides train for a few seconds on each dataset: about 40 s on 2 cores
def test_real_data_smoke():
    """benchmarks/real_data.py --smoke: segtrain and the plain loop on a tiny generated folder set (and ISBI where present)."""
    rows = table(run_benchmark("real_data.py"))
    folder = [row for row in rows if row["data"] == "folder"]
    assert [row["side"] for row in folder] == ["segtrain", "plain"]
    for row in rows:
        assert 0 <= float(row["best mIoU"]) <= 1 and int(row["validations"]) >= 1 and int(row["steps"]) >= 1, row


def test_batchnorm_eval_smoke():
    """benchmarks/batchnorm_eval.py --smoke: val mIoU with BatchNorm's running and re-estimated statistics."""
    output = run_benchmark("batchnorm_eval.py")
    rows = [line for line in output.splitlines() if line.startswith("{")]
    assert rows, output
    import json

    for row in map(json.loads, rows):
        assert 0 <= row["running"] <= 1 and 0 <= row["precise"] <= 1 and row["step"] >= 1, row
