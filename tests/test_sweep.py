"""Many runs: `train.py -m` with the basic, joblib and submitit launchers and the Optuna sweeper.

Each sweep is tiny (one short epoch per job); the tests read back the sweep's summary.csv,
summary.md and each job's metrics.json, as a user would.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import threading
import time

import pytest

from conftest import TINY, run_train_py
from segtrain.errors import ConfigError
from segtrain.sweep import claim_device, finished_result

# One epoch of two steps, no pictures: each job takes a few seconds.
SWEEP_TINY = [*TINY, "trainer.max_epochs=1", "dataset.train_samples=16", "dataset.val_samples=4", "trainer.log_images=0"]


def needs_plugin(module: str, package: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{package} is not installed (pip install -e '.[sweep]')"
    )


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    # On a shared 2-core machine, torch's default threads thrash: one step of a tiny model
    # takes seconds instead of milliseconds. The subprocesses inherit this.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def sweep(sweep_dir, *overrides):
    process = run_train_py(["-m", f"hydra.sweep.dir={sweep_dir}", *SWEEP_TINY, *overrides])
    assert process.returncode == 0, f"the sweep failed:\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    return process


def read_summary(sweep_dir):
    with open(sweep_dir / "summary.csv") as file:
        return list(csv.DictReader(file))


def check_ranked(rows):
    scores = [float(row["best_miou"]) for row in rows if row["best_miou"]]
    assert scores == sorted(scores, reverse=True), "jobs are ranked by best val mIoU"
    assert [row["rank"] for row in rows] == [str(rank) for rank in range(1, len(rows) + 1)]


def test_multirun_ranks_jobs_and_a_rerun_skips_the_finished_ones(tmp_path):
    process = sweep(tmp_path, "loss=ce,focal", "optimizer.lr=0.01,0.001")
    rows = read_summary(tmp_path)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"finished"}
    assert {(row["loss"], row["optimizer.lr"]) for row in rows} == {("ce", "0.01"), ("ce", "0.001"), ("focal", "0.01"), ("focal", "0.001")}
    check_ranked(rows)
    for row in rows:  # each job is complete, and the table shows its recorded result
        metrics = json.loads((tmp_path / row["job"] / "metrics.json").read_text())
        assert metrics["finished"] is True and (tmp_path / row["job"] / "last.pt").is_file()
        assert float(row["best_miou"]) == pytest.approx(metrics["best_miou"], abs=1e-4)
    table = (tmp_path / "summary.md").read_text()
    assert "| rank | job" in table and table.count("| finished |") == 4
    assert "sweep summary" in process.stdout and "| rank | job" in process.stdout

    # Interrupt job 1 before its first checkpoint, job 2 after one (metrics.json says not finished).
    for name in ("metrics.json", "last.pt", "best.pt"):
        (tmp_path / "1" / name).unlink()
    metrics_2 = json.loads((tmp_path / "2" / "metrics.json").read_text())
    (tmp_path / "2" / "metrics.json").write_text(json.dumps({**metrics_2, "finished": False}))
    untouched = (tmp_path / "0" / "metrics.json").stat().st_mtime_ns

    process = sweep(tmp_path, "loss=ce,focal", "optimizer.lr=0.01,0.001")
    output = process.stdout + process.stderr
    assert output.count("already finished") == 2, output[-3000:]
    assert "job 2 was interrupted: resuming" in output
    assert (tmp_path / "0" / "metrics.json").stat().st_mtime_ns == untouched, "a finished job is not run again"
    rows = read_summary(tmp_path)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"finished"}
    assert json.loads((tmp_path / "1" / "metrics.json").read_text())["finished"] is True


def test_rerun_with_other_overrides_is_refused(tmp_path):
    job_dir = tmp_path / "0"
    job_dir.mkdir()
    (job_dir / "metrics.json").write_text(json.dumps({"finished": True, "best_miou": 0.5}))
    (job_dir / "job.json").write_text(json.dumps({"job": 0, "overrides": ["optimizer.lr=0.01"]}))
    assert finished_result(job_dir, ["optimizer.lr=0.01"]) == 0.5
    with pytest.raises(ConfigError, match="hydra.sweep.dir=.*new hydra.sweep.dir"):
        finished_result(job_dir, ["optimizer.lr=0.1"])
    (job_dir / "metrics.json").write_text(json.dumps({"finished": False, "best_miou": 0.5}))
    assert finished_result(job_dir, ["optimizer.lr=0.1"]) is None, "an unfinished job runs"


def test_parallel_jobs_never_share_a_device(tmp_path):
    held, log = [], []

    def job(index):
        with claim_device([0, 1], tmp_path, poll_seconds=0.05) as device:
            held.append(device)
            log.append(("start", index, device, sorted(held)))
            time.sleep(0.3)
            held.remove(device)

    threads = [threading.Thread(target=job, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(log) == 4
    for _, _, _, devices in log:
        assert len(devices) == len(set(devices)) <= 2, f"two jobs held one device: {log}"


@pytest.mark.slow  # a new process per job
@needs_plugin("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher")
def test_joblib_runs_ddp_jobs_in_parallel_and_a_failed_job_does_not_end_the_sweep(tmp_path):
    # Each job is itself a 2-process DDP run spawned from inside a joblib (loky) worker; job 1's
    # ranks fail in build() (trainer keys are checked before spawning, so a missing init_from file it is).
    missing = tmp_path / "missing.pt"
    process = sweep(tmp_path, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "trainer.cpu_processes=2", f"+model.init_from=null,{missing}")
    rows = read_summary(tmp_path)
    assert [row["status"] for row in rows] == ["finished", "failed"], rows
    assert float(rows[0]["best_miou"]) >= 0
    assert not rows[1]["best_miou"]
    assert rows[1]["error"].startswith("RankError: DDP rank") and f"model.init_from={missing}" in rows[1]["error"], "the rank's own error"
    assert "job 1 failed: RankError: DDP rank" in (tmp_path / "summary.md").read_text()
    assert "model.init_from" in (tmp_path / "summary.md").read_text().split("job 1 failed:")[1].splitlines()[0]
    assert "Joblib.Parallel(n_jobs=2" in process.stdout + process.stderr


@pytest.mark.slow  # a new process per job
@needs_plugin("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
def test_submitit_local_runs_the_slurm_code_path(tmp_path):
    sweep(tmp_path, "hydra/launcher=slurm_local", "optimizer.lr=0.01,0.001", "hydra.launcher.timeout_min=5")
    rows = read_summary(tmp_path)
    assert len(rows) == 2 and {row["status"] for row in rows} == {"finished"}
    check_ranked(rows)
    assert list((tmp_path / ".submitit").iterdir()), "submitit ran the jobs (its logs are in <sweep dir>/.submitit)"


@pytest.mark.slow  # a new process per job
@needs_plugin("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper")
def test_optuna_maximises_best_miou_and_survives_a_failed_trial(tmp_path):
    # accumulate=0 fails; the seeded sampler draws it in some of the trials.
    sweep(
        tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra/sweeper/sampler=random",
        "trainer.accumulate=choice(1,0)",
    )
    rows = read_summary(tmp_path)
    assert len(rows) == 4, "every trial ran"
    statuses = [row["status"] for row in rows]
    assert "failed" in statuses and "finished" in statuses, statuses
    check_ranked(rows)
    assert {"optimizer.lr", "optimizer.weight_decay", "loss.gamma"} <= set(rows[0])
    results = (tmp_path / "optimization_results.yaml").read_text()
    best = max(float(row["best_miou"]) for row in rows if row["best_miou"])
    assert "best_value" in results and math.isclose(float(results.split("best_value:")[1].split()[0]), best, abs_tol=1e-4)
