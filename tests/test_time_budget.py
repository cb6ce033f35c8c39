"""trainer.max_time: a run that ends on a time budget, with its schedule laid over that time."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, compose_config, run_train_py
from segtrain.errors import ConfigError
from segtrain.schedules import TimeBudget, build_scheduler, describe, parse_seconds
from segtrain.trainer import TrainerSettings
from test_train import read_scalars

BUDGET = 6.0


def test_max_time_reads_seconds_or_clock_notation():
    assert parse_seconds(None) is None
    assert parse_seconds(300) == 300.0
    assert parse_seconds(2.5) == 2.5
    assert parse_seconds("00:05:00") == 300.0
    assert parse_seconds("1:30") == 90.0
    assert parse_seconds("01:00:00:00") == 86400.0
    for bad in (0, -3, "soon", "1:x", "1:2:3:4:5", True, float("inf")):
        with pytest.raises(ConfigError, match="trainer.max_time="):
            parse_seconds(bad)
    with pytest.raises(ConfigError, match="trainer.max_time=0"):
        TrainerSettings(max_time=0)  # refused before any work, like the other trainer keys


def learning_rates(name: str, budget: TimeBudget | None, total_steps: int, used: list[float], warmup: int = 0, hold: float = 0.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler({"name": name, "warmup_steps": warmup, "hold": hold}, optimizer, total_steps, 10, budget)
    rates = []
    for seconds in used:
        if budget is not None:
            budget.used = seconds
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_cosine_and_poly_follow_the_time_used_when_it_is_further_along_than_the_steps():
    budget = TimeBudget(100.0)
    # 1000 steps would take far longer than the budget: time decides. Half the budget used: half the cosine.
    rates = learning_rates("cosine", budget, 1000, [10.0, 50.0, 90.0, 100.0])
    assert rates == pytest.approx([(1 + math.cos(math.pi * p)) / 2 for p in (0.1, 0.5, 0.9, 1.0)], abs=1e-3)
    assert learning_rates("poly", TimeBudget(100.0), 1000, [50.0]) == pytest.approx([0.5**0.9], abs=1e-3)
    # Steps further along than time (a fast machine): the steps decide, as without a budget.
    with_budget = learning_rates("cosine", TimeBudget(1e6), 8, [1.0] * 8)
    without = learning_rates("cosine", None, 8, [0.0] * 8)
    assert with_budget == pytest.approx(without, abs=1e-9)
    # The last validation's time is set aside: the curve ends before the budget does.
    budget = TimeBudget(100.0)
    budget.reserve = 20.0
    assert learning_rates("cosine", budget, 1000, [80.0]) == pytest.approx([0.0], abs=1e-9)
    assert budget.exhausted()


def test_warm_up_stays_in_steps_then_the_curve_follows_time():
    budget = TimeBudget(100.0)
    rates = learning_rates("cosine", budget, 1000, [1.0, 2.0, 3.0, 4.0, 50.0], warmup=4)
    assert rates[0] < rates[1] < rates[2] < rates[3] == pytest.approx(1.0, abs=0.01), rates
    assert rates[4] == pytest.approx(0.5, abs=0.01)


def test_hold_keeps_the_full_rate_for_its_fraction_of_the_run_then_decays():
    # 10 warm-up steps, then 100 steps of which the first 60 hold the rate and the last 40 carry the whole cosine.
    rates = learning_rates("cosine", None, 110, [0.0] * 110, warmup=10, hold=0.6)
    assert rates[:9] == sorted(rates[:9]) and rates[8] < 1.0
    assert rates[9:70] == pytest.approx([1.0] * 61, abs=1e-9)
    assert rates[89] == pytest.approx(0.5, abs=1e-9)  # halfway through the decay: half the rate
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)
    assert learning_rates("poly", None, 100, [0.0] * 100, hold=0.5)[74] == pytest.approx(0.5**0.9, abs=1e-9)
    # With a time budget, the hold is a fraction of the time: 70 of 100 s used, hold 0.4 -> half the cosine.
    assert learning_rates("cosine", TimeBudget(100.0), 10**6, [70.0], hold=0.4) == pytest.approx([0.5], abs=1e-6)
    # hold=0 is torch's own CosineAnnealingLR, as before the key existed (checkpoints of earlier runs resume as they were).
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert isinstance(build_scheduler({"name": "cosine", "hold": 0.0}, optimizer, 10, 10), torch.optim.lr_scheduler.CosineAnnealingLR)


def test_a_held_schedule_resumes_where_it_stopped():
    def scheduler_after(steps: int, state: dict | None = None):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_scheduler({"name": "cosine", "warmup_steps": 5, "hold": 0.5}, optimizer, 100, 10)
        if state is not None:
            scheduler.load_state_dict(state)
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
        return scheduler, optimizer

    straight, straight_optimizer = scheduler_after(80)
    first, _ = scheduler_after(60)
    resumed, resumed_optimizer = scheduler_after(20, first.state_dict())
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(straight_optimizer.param_groups[0]["lr"], abs=1e-12)


def test_train_py_holds_the_rate_then_anneals_it_in_tensorboard(tmp_path, train_py):
    train_py(tmp_path, *TINY, "trainer.max_epochs=4", "trainer.log_every=1", "optimizer.lr=0.01", "scheduler.warmup_steps=0", "scheduler.hold=0.5")
    rates = [value for _, value in read_scalars(tmp_path)["train/lr"]]
    assert len(rates) == 4 * 6
    assert rates[:12] == pytest.approx([0.01] * 12, rel=1e-6), "the first half holds the full rate"
    assert all(later < earlier for earlier, later in zip(rates[12:], rates[13:])), "then it only falls"
    assert rates[-1] < 0.02 * 0.01
    assert "learning rate 0.01, scheduler=cosine: the full rate for 50% of the run, then down to 0" in (tmp_path / "train.log").read_text()


def test_the_schedule_in_words_for_the_log():
    assert describe({"name": "cosine", "warmup_steps": 10, "hold": 0.75, "min_lr": 0.0}, 625) == (
        "cosine: warm-up 10 steps, the full rate for 75% of the run, then down to 0"
    )
    assert describe({"name": "cosine", "warmup_steps": 50, "hold": 0.0, "min_lr": 1e-5}, 100) == "cosine: warm-up 20 steps, down to 1e-05 over the run"
    assert describe({"name": "poly", "hold": 0.0, "power": 0.9}, 100) == "poly: down to 0 over the run"
    assert describe({"name": "step", "warmup_steps": 0, "step_epochs": 10, "gamma": 0.1}, 100) == "step: x0.1 every 10 epochs"
    assert describe({"name": "none", "warmup_steps": 0}, 100) == "none: constant"


def test_a_bad_hold_names_the_key():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for bad in (1.0, -0.1, "half"):
        with pytest.raises(ConfigError, match=f"scheduler.hold={bad}: give the fraction"):
            build_scheduler({"name": "cosine", "hold": bad}, optimizer, 10, 10)
    with pytest.raises(ConfigError, match="scheduler=step has no decay to delay"):
        build_scheduler({"name": "step", "hold": 0.5}, optimizer, 10, 10)


def test_a_step_schedule_only_stops_on_time():
    assert learning_rates("step", TimeBudget(100.0), 1000, [99.0] * 3) == learning_rates("step", None, 1000, [0.0] * 3)


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("budget")
    process = run_train_py([f"hydra.run.dir={run_dir}", *TINY, "trainer.max_epochs=100000", f"trainer.max_time={BUDGET}", "optimizer.lr=0.01"])
    assert process.returncode == 0, process.stderr[-3000:]
    return run_dir


def test_a_run_with_max_time_stops_in_its_budget_with_the_rate_at_its_end(budget_run):
    metrics = json.loads((budget_run / "metrics.json").read_text())
    assert metrics["stopped_by"] == "max_time" and metrics["max_time"] == BUDGET
    # The final validation was expected to fit: the whole run, validations included, ends near the budget.
    assert BUDGET * 0.8 <= metrics["wall_seconds"] <= BUDGET + 1.5, metrics["wall_seconds"]
    assert metrics["epochs"] < 100000 and metrics["history"][-1]["epoch"] == metrics["epochs"], "the last epoch was validated"
    rates = [value for _, value in read_scalars(budget_run)["train/lr"]]
    warmup = compose_config([]).scheduler.warmup_steps  # the default cosine's, a step per logged rate (TINY: log_every=1)
    after_warmup = rates[warmup:]
    assert len(after_warmup) > 20, f"{len(rates)} steps logged"
    assert all(later <= earlier + 1e-9 for earlier, later in zip(after_warmup, after_warmup[1:])), "held, then the cosine only falls"
    assert after_warmup[-1] < 0.1 * 0.01, f"the rate ends near 0 with the budget: {after_warmup[-1]}"
    assert "stopped at max_time" in (budget_run / "train.log").read_text()


def test_resume_may_not_change_max_time_under_a_cosine_schedule(budget_run):
    process = run_train_py([f"resume={budget_run}", "trainer.max_time=60"])
    assert process.returncode == 1
    assert "trainer.max_time=60 (the checkpoint: 6.0)" in process.stderr + process.stdout


def test_max_time_in_the_resolved_config_and_a_bad_value_names_the_key(budget_run, tmp_path):
    assert compose_config(["trainer.max_time=00:01:00"]).trainer.max_time == "00:01:00"
    process = run_train_py([f"hydra.run.dir={tmp_path}", *TINY, "trainer.max_time=soon"])
    assert process.returncode == 1 and "trainer.max_time=soon: give seconds" in process.stdout + process.stderr, process.stdout[-2000:]
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.slow  # two gloo processes
def test_ddp_processes_agree_on_the_stop_and_the_rate(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={tmp_path}", *TINY, "model.norm=group", "dataset.batch_size=4",
         "trainer.cpu_processes=2", "trainer.max_epochs=100000", "trainer.max_time=8", "trainer.dist_timeout=30", "trainer.log_images=0"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["stopped_by"] == "max_time" and metrics["wall_seconds"] <= 8 + 2.0, metrics["wall_seconds"]
