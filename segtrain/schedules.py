"""Learning-rate schedules over a run, and the run's time budget (``trainer.max_time``).

A run ends at whichever of its limits comes first: ``trainer.max_epochs`` (or ``max_steps``)
or ``trainer.max_time``. The schedules that span the whole run (cosine, poly) follow the
run's *progress*: the larger of the fraction of steps done and, with a time budget, the
fraction of the budget used, so that the rate reaches its end when the run does. Their
``hold`` keeps the full rate for that fraction of the run (after the warm-up) and decays over
the rest ("warmup-stable-decay"; fastai's ``fit_flat_cos``). Without a time budget and without a
hold they are torch's own step schedulers (checkpoints of earlier runs resume as they were).
With a budget, the learning rate depends on how fast the machine is: the run is not
reproducible step for step, which the log says.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from segtrain.errors import ConfigError

Scheduler = torch.optim.lr_scheduler.LRScheduler


def parse_seconds(value: Any, key: str = "trainer.max_time") -> float | None:
    """``trainer.max_time`` as seconds: a number of seconds or ``"[[DD:]HH:]MM:SS"`` (Lightning's
    notation); null for no budget."""
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        parts = value.strip().split(":")
        try:
            numbers = [float(part) for part in parts]
        except ValueError:
            numbers = []
        if 1 <= len(numbers) <= 4 and all(number >= 0 for number in numbers):
            seconds = sum(number * unit for number, unit in zip(reversed(numbers), (1, 60, 3600, 86400)))
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{key}={value}: give seconds (e.g. {key}=300) or HH:MM:SS (e.g. {key}=00:05:00), or null for no time limit")
    return seconds


class TimeBudget:
    """``trainer.max_time``: the seconds a run may take, all sessions of a resumed run together,
    from the start of training (after the build and the data audit) and including validations.

    The trainer sets ``used`` (seconds so far) after each optimizer step and ``reserve`` (what the
    last validation took, with its checkpoints) after each validation; under DDP both are the
    maximum over the processes, so that all of them see the same schedule and stop at the same
    step. Training stops when ``used + reserve`` reaches the budget: the final validation is
    expected to fit in it too.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.used = 0.0
        self.reserve = 0.0

    def fraction(self) -> float:
        """How far the run is through its budget, 0..1 (the final validation's time set aside)."""
        return min(1.0, self.used / max(self.seconds - self.reserve, 1e-9))

    def exhausted(self) -> bool:
        return self.used + self.reserve >= self.seconds


# The scheduler keys' values where a config leaves them out (one place: the schedulers and the log's wording read them).
DEFAULTS: dict[str, Any] = {"warmup_steps": 0, "hold": 0.0, "min_lr": 0.0, "power": 0.9, "step_epochs": 10, "gamma": 0.1}


def build_scheduler(
    scheduler_cfg: dict[str, Any], optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
    budget: TimeBudget | None = None,
) -> Scheduler:
    """A torch scheduler stepped once per optimizer step, with an optional linear warm-up.

    ``total_steps`` is the run's length in steps; with a ``budget`` the cosine and poly curves
    follow whichever of steps and time is further along."""
    params = {**DEFAULTS, **scheduler_cfg}
    name = params.pop("name")
    warmup_steps = warmup_steps_of(params.pop("warmup_steps"), total_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    schedules: dict[str, Callable[[], Scheduler]] = {
        "none": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, decay_steps, eta_min=params["min_lr"]),
        "poly": lambda: torch.optim.lr_scheduler.PolynomialLR(optimizer, decay_steps, power=params["power"]),
        "step": lambda: torch.optim.lr_scheduler.StepLR(
            optimizer, max(1, int(params["step_epochs"]) * steps_per_epoch), gamma=params["gamma"]
        ),
    }
    if name not in schedules:
        raise ConfigError(f"scheduler={name}: unknown scheduler; known: {', '.join(sorted(schedules))}")
    hold = params.pop("hold") or 0.0
    if not isinstance(hold, (int, float)) or not 0.0 <= hold < 1.0:
        raise ConfigError(f"scheduler.hold={hold}: give the fraction of the run at the full rate before the decay, from 0 (decay from the start) up to below 1")
    if hold and name not in CURVES:
        raise ConfigError(f"scheduler.hold={hold}: only {' and '.join(sorted(CURVES))} hold their rate; scheduler={name} has no decay to delay (drop the key)")
    if name in CURVES and (budget is not None or hold > 0):
        schedule = progress_schedule(optimizer, held(CURVES[name](params), hold), decay_steps, budget)
    else:
        schedule = schedules[name]()
    if warmup_steps <= 0:
        return schedule
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, schedule], milestones=[warmup_steps])


def warmup_steps_of(warmup_steps: int | None, total_steps: int) -> int:
    """``scheduler.warmup_steps`` as applied: a short run keeps most of its steps for the schedule,
    so the warm-up takes at most a fifth of it."""
    return min(int(warmup_steps or 0), total_steps // 5)


def describe(scheduler_cfg: dict[str, Any], total_steps: int) -> str:
    """The schedule in words, for the run's log: ``cosine: warm-up 10 steps, the full rate for 75% of
    the run, then down to 0``."""
    params = {**DEFAULTS, **scheduler_cfg}
    name = params["name"]
    warmup = warmup_steps_of(params["warmup_steps"], total_steps)
    parts = [f"warm-up {warmup} steps"] if warmup else []
    if name in CURVES:
        hold, end = params["hold"] or 0.0, params["min_lr"] if name == "cosine" else 0.0
        parts.append(f"the full rate for {hold:.0%} of the run, then down to {end:g}" if hold else f"down to {end:g} over the run")
    elif name == "step":
        parts.append(f"x{params['gamma']:g} every {params['step_epochs']} epochs")
    else:
        parts.append("constant")
    return f"{name}: {', '.join(parts)}"


# Learning rate as a function of the run's progress p in [0, 1] and the group's initial rate:
# the closed forms of torch's CosineAnnealingLR and PolynomialLR.
CURVES: dict[str, Callable[[dict[str, Any]], Callable[[float, float], float]]] = {
    "cosine": lambda params: lambda p, lr: params["min_lr"] + (lr - params["min_lr"]) * (1 + math.cos(math.pi * p)) / 2,
    "poly": lambda params: lambda p, lr: lr * (1 - p) ** params["power"],
}


def held(curve: Callable[[float, float], float], hold: float) -> Callable[[float, float], float]:
    """``curve`` after the full rate for the first ``hold`` of the run's progress."""
    if hold <= 0:
        return curve
    return lambda p, lr: curve(max(0.0, p - hold) / (1.0 - hold), lr)


def progress_schedule(
    optimizer: torch.optim.Optimizer, curve: Callable[[float, float], float], decay_steps: int, budget: TimeBudget | None
) -> Scheduler:
    """``curve`` over the run's progress: the larger of the steps' and, with one, the time budget's
    (plain functions: LambdaLR stores nothing of them in its state_dict, and the budget's time is
    in the checkpoint's state)."""

    def factor_for(initial_lr: float) -> Callable[[int], float]:
        def factor(step: int) -> float:
            progress = min(1.0, step / decay_steps)
            if budget is not None:
                progress = max(progress, budget.fraction())
            return curve(progress, initial_lr) / initial_lr if initial_lr else 0.0

        return factor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_for(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups])
