"""What the speed benchmarks share: the real config, segtrain's trainer built in-process,
the plain PyTorch loop it is measured against, and the interleaved timing rounds.

Both sides train the same model object with the same optimizer and loss on the same
batches: segtrain through ``Trainer.train_one_epoch`` (its own DataLoader, logging,
progress bar and all), the plain loop over those batches already materialised on the
device. One "epoch" of the trainer is one timing round: the training set holds exactly
``steps * batch_size`` samples.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a fresh clone without installing

from segtrain.build import Components, build  # noqa: E402
from segtrain.host_memory import keep_freed_memory_for_cpu_training  # noqa: E402
from segtrain.losses import AuxiliaryHeadLoss  # noqa: E402
from segtrain.run import make_trainer  # noqa: E402
from segtrain.run_log import RunLog  # noqa: E402
from segtrain.trainer import PRECISIONS, Trainer  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


def compose_config(overrides: list[str]) -> DictConfig:
    """``configs/train.yaml`` with overrides, as ``python train.py`` would see it."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def machine() -> str:
    """One line for the results table: CPU count, torch version, device, date."""
    import os

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{device}; nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; load average at start {load:.2f}"
    )


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when given. On a CPU shared with other processes, one thread per
    core spins at every op's barrier while a sibling is descheduled: small ops get 10-100x slower."""
    if threads:
        torch.set_num_threads(threads)


class DataWaitTimer:
    """The trainer's DataLoader, adding up how long each ``next()`` blocks the loop.

    That is the CPU-side data time (torchvision's references report it as "data"): an
    upper bound on the accelerator's idle time spent waiting for batches.
    """

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader, self.seconds = loader, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, dataset, batch_size: the real loader's
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield batch


@dataclass
class Bench:
    """One model and config, built once; both loops train ``components.model``."""

    cfg: DictConfig
    components: Components
    trainer: Trainer
    data_timer: DataWaitTimer
    batches: list[Batch] = field(default_factory=list)
    # The plain loop's GradScaler (fp16 only), kept across rounds as a real loop keeps it.
    plain_scaler: torch.amp.GradScaler | None = None

    @property
    def device(self) -> torch.device:
        return self.components.device


def build_bench(overrides: list[str], run_dir: Path) -> Bench:
    """segtrain's components and Trainer from the real config (RunLog writing TensorBoard into
    ``run_dir``), and the training batches of one epoch on the device for the plain loop."""
    cfg = compose_config(overrides)
    components, run_cfg = build(cfg)
    # As segtrain.run.train does: the allocator setting of a CPU training run (the whole process, so both loops).
    keep_freed_memory_for_cpu_training(components.device.type, bool(cfg.trainer.keep_freed_memory))
    run_log = RunLog(run_dir, components.class_names, None, cfg.trainer.log_image_size)
    trainer = make_trainer(cfg, components, run_cfg, run_dir, run_log)
    timer = DataWaitTimer(trainer.train_loader)
    trainer.train_loader = timer  # type: ignore[assignment]
    # Iterating the loader once also fills the shapes dataset's sample cache (num_workers=0).
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    batches = [
        (images.to(components.device).to(memory_format=memory_format), masks.to(components.device))
        for images, masks in components.train_loader
    ]
    fp16 = trainer.dtype == torch.float16 and components.device.type == "cuda"
    return Bench(cfg, components, trainer, timer, batches, torch.amp.GradScaler("cuda") if fp16 else None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def segtrain_round(bench: Bench) -> tuple[float, float]:
    """One epoch of the real training loop; (wall seconds, process CPU seconds)."""
    trainer = bench.trainer
    synchronize(bench.device)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train_one_epoch({})
    synchronize(bench.device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trainer.state.epoch, trainer.state.batch = trainer.state.epoch + 1, 0  # as Trainer.fit does between epochs
    return wall, cpu


def plain_loss(loss_fn: nn.Module, outputs: torch.Tensor | dict[str, torch.Tensor], masks: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """The loss a hand-written loop computes: torchvision's aux head weighted in when present."""
    if isinstance(outputs, dict):
        return loss_fn(outputs["out"], masks) + aux_weight * loss_fn(outputs["aux"], masks)
    return loss_fn(outputs, masks)


def plain_loop(
    model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch],
    dtype: torch.dtype = torch.float32, scaler: torch.amp.GradScaler | None = None, aux_weight: float = 0.0,
) -> None:
    """The shortest training loop over tensors already on the device: no logging, no checks.

    ``dtype`` other than float32 adds autocast, ``scaler`` (fp16) a GradScaler, as any
    hand-written mixed-precision loop would.
    """
    model.train()
    for images, masks in batches:
        amp = torch.autocast(images.device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with amp:
            loss = plain_loss(loss_fn, model(images), masks, aux_weight)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def plain_round(bench: Bench, model: nn.Module) -> tuple[float, float]:
    """The plain loop over one epoch's batches; (wall seconds, process CPU seconds)."""
    components, settings = bench.components, bench.trainer.settings
    dtype = PRECISIONS[settings.precision]
    if bench.device.type != "cuda" and dtype == torch.float16:
        dtype = torch.float32  # as the trainer does: fp16 autocast needs CUDA
    synchronize(bench.device)
    wall, cpu = time.perf_counter(), time.process_time()
    loss_fn, aux_weight = components.loss_fn, 0.0
    if isinstance(loss_fn, AuxiliaryHeadLoss):  # the hand-written loop weighs torchvision's aux head itself
        loss_fn, aux_weight = loss_fn.loss, loss_fn.weight
    plain_loop(model, loss_fn, components.optimizer, bench.batches, dtype, bench.plain_scaler, aux_weight)
    synchronize(bench.device)
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Timings:
    """Per-round wall and CPU seconds of both loops, and the per-round ratios."""

    steps: int
    segtrain_wall: list[float] = field(default_factory=list)
    segtrain_cpu: list[float] = field(default_factory=list)
    plain_wall: list[float] = field(default_factory=list)
    plain_cpu: list[float] = field(default_factory=list)
    segtrain_data: list[float] = field(default_factory=list)  # seconds the trainer's loop waited on next(batch)

    def steps_per_second(self, which: str) -> float:
        return self.steps / statistics.median(getattr(self, f"{which}_wall"))

    def ratio(self, kind: str = "wall") -> float:
        """Median over rounds of segtrain's speed / the plain loop's speed (1.0: no overhead)."""
        ratios = [p / s for s, p in zip(getattr(self, f"segtrain_{kind}"), getattr(self, f"plain_{kind}"))]
        return statistics.median(ratios)

    def data_wait_fraction(self) -> float:
        """Median over rounds of the share of segtrain's step time spent blocked on the DataLoader."""
        return statistics.median(data / wall for data, wall in zip(self.segtrain_data, self.segtrain_wall))


def interleaved_rounds(bench: Bench, rounds: int, plain_model: nn.Module | None = None) -> Timings:
    """Warm up both loops once, then ``rounds`` rounds of each, the order alternating
    (segtrain first, then plain first, ...) so that a machine getting busier or quieter
    slows both alike."""
    model = plain_model if plain_model is not None else bench.components.model
    segtrain_round(bench)
    plain_round(bench, model)
    timings = Timings(steps=len(bench.batches))
    for index in range(rounds):
        order: list[tuple[str, Callable[[], tuple[float, float]]]] = [
            ("segtrain", lambda: segtrain_round(bench)), ("plain", lambda: plain_round(bench, model))
        ]
        for name, run in order if index % 2 == 0 else reversed(order):
            data_before = bench.data_timer.seconds
            wall, cpu = run()
            if name == "segtrain":
                timings.segtrain_data.append(bench.data_timer.seconds - data_before)
            getattr(timings, f"{name}_wall").append(wall)
            getattr(timings, f"{name}_cpu").append(cpu)
    return timings


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, ready to paste into benchmarks/README.md."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    print("| " + " | ".join(str(cell).ljust(width) for cell, width in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + " |")
