"""Many runs: the jobs of a Hydra multirun (``python train.py -m ...``) and the sweep's summary table.

Each job runs in its own dir ``<sweep dir>/<job number>/`` and records in ``job.json`` the
overrides it runs with. Re-running the same command on the same sweep dir
(``hydra.sweep.dir=...``) skips the jobs whose ``metrics.json`` says ``"finished": true``
(returning their recorded best val mIoU, so sweepers still see it) and resumes interrupted
jobs from their ``last.pt``. A job that fails is logged and returns NaN, so one diverging
learning rate does not end the sweep (nor an Optuna study). At the end, ``SweepSummary``
ranks the jobs by best val mIoU in ``summary.csv`` and ``summary.md`` in the sweep dir.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from segtrain.errors import ConfigError
from segtrain.overrides import split_override

log = logging.getLogger(__name__)

JOB_FILE = "job.json"


def in_multirun() -> bool:
    """True inside a job of ``python train.py -m ...`` (any sweeper and launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or half-written by a killed job
        return None


def write_json(path: Path, content: dict[str, Any]) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    temporary.replace(path)


def finished_result(run_dir: Path, overrides: Sequence[str]) -> float | None:
    """The recorded best val mIoU when this job dir already holds a finished run of these overrides; else None.

    Raises ``ConfigError`` when the dir holds a finished run of *other* overrides: the
    re-run targets a sweep dir of another command, and skipping would mix results.
    """
    metrics = read_json(run_dir / "metrics.json")
    if not metrics or not metrics.get("finished"):
        return None
    job = read_json(run_dir / JOB_FILE) or {}
    if list(job.get("overrides", [])) != list(overrides):
        raise ConfigError(
            f"hydra.sweep.dir={run_dir.parent}: job {run_dir.name} there finished with overrides "
            f"{job.get('overrides')}, but this sweep gives it {list(overrides)}; re-run the same command to "
            "complete an interrupted sweep, or give a new hydra.sweep.dir"
        )
    best = metrics.get("best_miou")
    return float(best) if best is not None else math.nan


def run_sweep_job(cfg: DictConfig, run_dir: str | Path, run: Callable[[DictConfig, Path], float]) -> float:
    """Run one multirun job with ``run(cfg, run_dir)``: skip it if finished, resume it if interrupted,
    return NaN (logged, recorded in ``job.json``) if it fails."""
    from hydra.core.hydra_config import HydraConfig

    from segtrain.trainer import Interrupted

    run_dir = Path(run_dir)
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    job = {"job": hydra_cfg.job.num, "overrides": overrides}
    recorded = finished_result(run_dir, overrides)
    if recorded is not None:
        log.info("job %s (%s) already finished in %s: skipped, best val mIoU %.4f", job["job"], " ".join(overrides), run_dir, recorded)
        return recorded
    previous = read_json(run_dir / JOB_FILE) or {}
    if (run_dir / "last.pt").is_file() and previous.get("overrides") == overrides and not cfg.get("resume"):
        log.info("job %s was interrupted: resuming from %s", job["job"], run_dir / "last.pt")
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.resume = str(run_dir / "last.pt")
    write_json(run_dir / JOB_FILE, {**job, "status": "running"})
    try:
        with job_device(cfg, run_dir.parent) as job_cfg:
            best = run(job_cfg, run_dir)
    except Interrupted:
        write_json(run_dir / JOB_FILE, {**job, "status": "interrupted"})
        raise
    except Exception as error:  # one failing job (diverged, out of memory, bad value) must not end the sweep
        log.exception("job %s (%s) failed: %s", job["job"], " ".join(overrides), error)
        write_json(run_dir / JOB_FILE, {**job, "status": "failed", "error": f"{type(error).__name__}: {error}"})
        if sweeper_records_failures():
            raise  # Optuna marks the trial failed and goes on (max_failure_rate); it cannot take NaN (see below)
        return math.nan
    write_json(run_dir / JOB_FILE, {**job, "status": "finished"})
    return best


def sweeper_records_failures() -> bool:
    """True for the Optuna sweeper: a failed job must raise, not return NaN.

    Hydra's basic sweeper ends the sweep at the first failed job, so there a failure returns
    NaN. hydra-optuna-sweeper 1.3.0 with optuna 2.10 instead crashes the study on a NaN
    (it tells the trial FAIL *with* the value, which optuna refuses), while an exception
    is recorded as a failed trial.
    """
    from hydra.core.hydra_config import HydraConfig

    return "optuna" in str(OmegaConf.select(HydraConfig.get(), "sweeper._target_", default="") or "").lower()


# ------------------------------------------------------------------ one GPU per parallel job
def shares_devices() -> bool:
    """True when jobs of this sweep run side by side on one machine (the joblib launcher)."""
    from hydra.core.hydra_config import HydraConfig

    target = str(OmegaConf.select(HydraConfig.get(), "launcher._target_", default="") or "")
    return "joblib" in target.lower()


@contextlib.contextmanager
def claim_device(devices: Sequence[int], lock_dir: Path, poll_seconds: float = 1.0) -> Iterator[int]:
    """Hold one entry of ``devices`` for the duration of the block, waiting while all are taken.

    A lock file per device (``flock``, released by the kernel even if the job is killed)
    guarantees that no two jobs of the sweep share a GPU, whichever order the launcher
    starts them in.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for device in devices:
            handle = open(lock_dir / f"device_{device}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield device
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if not waited:
            log.info("all of device_list=%s are taken by other jobs of the sweep; waiting for one", list(devices))
            waited = True
        time.sleep(poll_seconds)


@contextlib.contextmanager
def job_device(cfg: DictConfig, sweep_dir: Path) -> Iterator[DictConfig]:
    """With the joblib launcher and CUDA devices, give the job one device of ``device_list`` for itself."""
    if not shares_devices():
        yield cfg
        return
    devices = OmegaConf.to_object(cfg.device_list) if cfg.device_list is not None else None
    if devices is None:
        import torch

        devices = list(range(torch.cuda.device_count()))  # null: every visible GPU, one per job
    if not devices:  # the CPU: share the cores, or n_jobs processes each running all-core kernels thrash
        import torch

        from hydra.core.hydra_config import HydraConfig

        n_jobs = int(OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=-1) or -1)
        cores = os.cpu_count() or 1
        threads = max(1, cores // (cores if n_jobs < 1 else n_jobs))
        torch.set_num_threads(threads)
        log.info("parallel sweep job on the CPU: %d torch thread(s) (%d cores, hydra.launcher.n_jobs=%d)", threads, cores, n_jobs)
        yield cfg
        return
    with claim_device(devices, sweep_dir / ".devices") as device:
        log.info("parallel sweep job: training on CUDA device %d of device_list=%s", device, devices)
        job_cfg = cfg.copy()
        with open_dict(job_cfg):
            job_cfg.device_list = [device]
        yield job_cfg


# --------------------------------------------------------------------------- summary
@dataclass
class JobRow:
    job: str
    best_miou: float | None
    best_epoch: int | None
    status: str  # finished | failed | interrupted | running | not started
    overrides: dict[str, str]
    error: str = ""


def job_number(job_dir: Path, sweep_dir: Path) -> tuple:
    relative = job_dir.relative_to(sweep_dir).as_posix()
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in relative.split("/"))


def collect_jobs(sweep_dir: Path) -> list[JobRow]:
    """One row per job dir (a dir holding ``.hydra/overrides.yaml``) under the sweep dir."""
    job_dirs = sorted((path.parent.parent for path in sweep_dir.glob("**/.hydra/overrides.yaml")), key=lambda d: job_number(d, sweep_dir))
    rows = []
    for job_dir in job_dirs:
        overrides = [str(item) for item in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
        metrics = read_json(job_dir / "metrics.json") or {}
        job = read_json(job_dir / JOB_FILE) or {}
        if metrics.get("finished"):
            status = "finished"
        else:
            status = job.get("status") or ("running" if metrics else "not started")
            status = "interrupted" if status == "running" and metrics else status
        best = metrics.get("best_miou")
        rows.append(JobRow(
            job=job_dir.relative_to(sweep_dir).as_posix(),
            best_miou=float(best) if best is not None and math.isfinite(best) else None,
            best_epoch=metrics.get("best_epoch"),
            status=status,
            overrides=dict(split_override(override) for override in overrides),
            error=job.get("error", ""),
        ))
    return rows


def rank_jobs(rows: list[JobRow]) -> list[JobRow]:
    """Best val mIoU first; jobs without one (failed, not started) last, in job order."""
    return sorted(rows, key=lambda row: (row.best_miou is None, -(row.best_miou or 0.0)))


def swept_keys(rows: list[JobRow]) -> tuple[list[str], dict[str, str]]:
    """The override keys whose values differ between jobs (the table's columns), and those common to all."""
    keys = list(dict.fromkeys(key for row in rows for key in row.overrides))
    values = {key: {row.overrides.get(key) for row in rows} for key in keys}
    common = {key: next(iter(values[key])) for key in keys if len(values[key]) == 1 and None not in values[key]}
    return [key for key in keys if key not in common], common  # type: ignore[misc]


def summary_table(rows: list[JobRow]) -> tuple[list[str], list[list[str]]]:
    keys, _ = swept_keys(rows)
    header = ["rank", "job", "best_miou", "best_epoch", "status", *keys]
    body = [
        [
            str(rank), row.job, f"{row.best_miou:.4f}" if row.best_miou is not None else "",
            str(row.best_epoch) if row.best_epoch is not None else "", row.status,
            *(row.overrides.get(key, "") for key in keys),
        ]
        for rank, row in enumerate(rank_jobs(rows), start=1)
    ]
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, body)])


def short_error(error: str) -> str:
    """First and last line of an error (a DDP rank's error carries its traceback; summary.csv keeps it all)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"


def write_summary(sweep_dir: str | Path) -> list[JobRow]:
    """Rank the jobs of ``sweep_dir`` by best val mIoU; write ``summary.csv`` and ``summary.md`` there; print the table."""
    sweep_dir = Path(sweep_dir)
    rows = collect_jobs(sweep_dir)
    header, body = summary_table(rows)
    ranked = rank_jobs(rows)
    with open(sweep_dir / "summary.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([*header, "error"])
        writer.writerows([*cells, row.error] for cells, row in zip(body, ranked))
    table = markdown(header, body)
    _, common = swept_keys(rows)
    common_line = f"\nOverrides of every job: {' '.join(f'{key}={value}' for key, value in common.items())}\n" if common else ""
    failed = [row for row in ranked if row.status == "failed"]
    notes = "".join(f"\njob {row.job} failed: {short_error(row.error)}" for row in failed)
    (sweep_dir / "summary.md").write_text(
        f"# Sweep {sweep_dir}\n\nJobs ranked by best val mIoU.\n{common_line}\n{table}\n{notes}\n"
    )
    print(f"\nsweep summary ({sweep_dir}/summary.md), ranked by best val mIoU:{common_line}\n{table}{notes}", flush=True)
    return rows


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks.sweep_summary`` in configs/train.yaml): the summary table at the end of a multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        if rows and all(row.status == "failed" for row in rows):
            log.error("every job of the sweep failed; see %s and the jobs' logs", sweep_dir / "summary.md")
            sys.exit(1)  # Hydra turns a callback's exceptions into warnings; the exit status must say it failed
