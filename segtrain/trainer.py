"""The training loop: batch to device, forward, loss, backward, step, schedule, log."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segtrain.checkpoint import save_checkpoint, unwrap
from segtrain.losses import loss_terms
from segtrain.metrics import ConfusionMatrix
from segtrain.run_log import RunLog
from segtrain.task import predict

log = logging.getLogger(__name__)


@dataclass
class TrainerSettings:
    max_epochs: int = 12
    max_steps: int | None = None
    val_every: int = 1
    log_every: int = 10
    progress_bar: bool = True
    save_checkpoints: bool = True


@dataclass
class EpochResult:
    step: int
    images: int
    seconds: float


def train_one_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    step: int,
    settings: TrainerSettings,
    run_log: RunLog,
) -> EpochResult:
    model.train()
    images_seen, start = 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not settings.progress_bar, leave=False, dynamic_ncols=True)
    for images, masks in bar:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        logits = model(images)
        loss, terms = loss_terms(loss_fn, logits, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        images_seen += images.shape[0]
        if step % settings.log_every == 0:
            # .item() waits for the GPU: only on logging steps.
            lr = optimizer.param_groups[0]["lr"]
            values = {"train/loss": loss.item(), "train/lr": lr}
            if len(terms) > 1:
                values.update({f"train/loss/{name}": term.item() for name, term in terms.items()})
            run_log.scalars(step, values)
            speed = images_seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
        if settings.max_steps is not None and step >= settings.max_steps:
            break
    return EpochResult(step, images_seen, time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, ignore_index: int | None
) -> dict[str, Any]:
    """Validation loss (mean over samples) and metrics from one confusion matrix over the whole split."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index, device)
    loss_sum, samples = torch.zeros((), device=device), 0
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += loss_fn(logits, masks).detach() * images.shape[0]
        samples += images.shape[0]
        confusion.update(predict(logits), masks)
    confusion.reduce_across_processes()
    return {"loss": float(loss_sum) / max(samples, 1), **confusion.compute()}


def is_finite_model(model: nn.Module) -> bool:
    return all(torch.isfinite(parameter).all() for parameter in model.parameters())


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device,
    num_classes: int,
    ignore_index: int | None,
    class_names: list[str],
    settings: TrainerSettings,
    run_log: RunLog,
    run_dir: Path,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Train for ``max_epochs`` (or ``max_steps``), validating every ``val_every`` epochs; returns metrics.json's content."""
    start = time.perf_counter()
    step, epoch, train_images, train_seconds = 0, 0, 0, 0.0
    best = {"miou": -math.inf, "epoch": None}
    history: list[dict[str, Any]] = []
    max_epochs = settings.max_epochs
    if settings.max_steps is not None:
        max_epochs = math.ceil(settings.max_steps / max(len(train_loader), 1))
    final: dict[str, Any] = {}
    for epoch in range(1, max_epochs + 1):
        result = train_one_epoch(model, loss_fn, optimizer, scheduler, train_loader, device, epoch, step, settings, run_log)
        step, train_images, train_seconds = result.step, train_images + result.images, train_seconds + result.seconds
        last_epoch = epoch == max_epochs or (settings.max_steps is not None and step >= settings.max_steps)
        if epoch % settings.val_every == 0 or last_epoch:
            final = validate(model, loss_fn, val_loader, device, num_classes, ignore_index, class_names, epoch, step, run_log)
            history.append(final)
            improved = final["mIoU"] > best["miou"] and is_finite_model(model)
            if improved:
                best = {"miou": final["mIoU"], "epoch": epoch}
            if settings.save_checkpoints:
                save_checkpoints(model, optimizer, scheduler, epoch, step, best, config, run_dir, improved)
            run_log.flush()
        if last_epoch:
            break
    metrics = {
        "best_miou": best["miou"] if best["epoch"] is not None else None,
        "best_epoch": best["epoch"],
        "final": final,
        "epochs": epoch,
        "steps": step,
        "wall_seconds": time.perf_counter() - start,
        "train_seconds": train_seconds,
        "images_per_second": train_images / train_seconds if train_seconds > 0 else None,
        "history": history,
        "finished": True,
    }
    run_log.write_metrics(metrics)
    return metrics


def validate(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    ignore_index: int | None,
    class_names: list[str],
    epoch: int,
    step: int,
    run_log: RunLog,
) -> dict[str, Any]:
    """Evaluate, log to TensorBoard at the global step, and return the metrics with class names."""
    metrics = evaluate(model, loss_fn, loader, device, num_classes, ignore_index)
    scalars = {"val/loss": metrics["loss"], "val/mIoU": metrics["mIoU"], "val/acc": metrics["acc"], "val/dice": metrics["dice"]}
    for name, iou in zip(class_names, metrics["IoU"]):
        if not math.isnan(iou):
            scalars[f"val/IoU/{name}"] = iou
    run_log.scalars(step, scalars)
    per_class = ", ".join(f"{name} {iou:.3f}" for name, iou in zip(class_names, metrics["IoU"]))
    log.info("epoch %d step %d: val loss %.4f, mIoU %.4f, acc %.4f (IoU: %s)", epoch, step, metrics["loss"], metrics["mIoU"], metrics["acc"], per_class)
    return {
        "epoch": epoch,
        "step": step,
        **metrics,
        "IoU": dict(zip(class_names, metrics["IoU"])),
        "Dice": dict(zip(class_names, metrics["Dice"])),
    }


def save_checkpoints(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    step: int,
    best: dict[str, Any],
    config: dict[str, Any],
    run_dir: Path,
    improved: bool,
) -> None:
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "best_miou": best["miou"],
        "best_epoch": best["epoch"],
        "config": config,
    }
    save_checkpoint(run_dir / "last.pt", state)
    if improved:
        save_checkpoint(run_dir / "best.pt", state)
