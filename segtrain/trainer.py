"""The training loop: batch to device, forward, loss, backward, clip, step, schedule, log.

``Trainer.train_one_epoch`` is the loop; everything it needs to resume exactly (epoch,
batch within the epoch, step, best metric, history, RNG states) lives in ``TrainState``
and the checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segtrain.batches import EpochSampler
from segtrain.checkpoint import restore_training, save_checkpoint, training_checkpoint
from segtrain.errors import ConfigError, TrainingError
from segtrain.inference import SlidingWindow, segment_logits, sliding_window_from
from segtrain.losses import loss_terms
from segtrain.metrics import ConfusionMatrix
from segtrain.run_log import RunLog, system_scalars
from segtrain.schedules import parse_seconds
from segtrain.task import classes_from_logits
from segtrain.visualize import fixed_samples

if TYPE_CHECKING:  # the builder's product; trainer.py itself builds nothing
    from segtrain.build import Components

log = logging.getLogger(__name__)

PRECISIONS = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


@dataclass
class TrainerSettings:
    max_epochs: int = 5
    max_steps: int | None = None
    max_time: float | str | None = None  # seconds or "HH:MM:SS" for the whole run; build makes Components.time_budget of it
    val_every: int | str = 1  # or "auto": build decides (Components.val_every), the trainer reads that
    log_every: int = 10
    progress_bar: bool = True
    save_checkpoints: bool = True
    ckpt_every_steps: int | None = None  # also write last.pt every N optimizer steps (mid-epoch resume)
    precision: str = "32"  # 32 | bf16 | 16 (fp16 with a GradScaler); autocast on CUDA (bf16 also on the CPU)
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    keep_freed_memory: bool = True  # CPU training: glibc malloc reuses freed memory (segtrain/host_memory.py); applied by run.train
    accumulate: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float | None = None
    max_bad_steps: int = 5  # this many non-finite losses in a row stop the run
    log_images: int = 4  # fixed validation samples pictured in TensorBoard at each validation (0: none)
    log_image_size: int = 128  # pixels per picture tile (larger samples are shrunk)
    val_mode: str = "whole"  # whole | slide (sliding-window inference, segtrain/inference.py)
    window: int | list[int] | None = None  # slide: window size (the config's default is dataset.size)
    stride: int | list[int] | None = None  # slide: step between windows; null: half the window

    def __post_init__(self) -> None:
        parse_seconds(self.max_time)  # a bad value is one ConfigError before any work
        self.precision = str(self.precision)  # `trainer.precision=32` on the command line arrives as an int
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision}: use one of {', '.join(PRECISIONS)}")
        # Checked before any work: a zero here used to end in ZeroDivisionError after a whole epoch.
        counts = {"max_epochs": self.max_epochs, "log_every": self.log_every, "accumulate": self.accumulate,
                  "max_bad_steps": self.max_bad_steps}
        optional = {"max_steps": self.max_steps, "ckpt_every_steps": self.ckpt_every_steps}
        if self.val_every != "auto":
            counts["val_every"] = self.val_every
        for key, value in [*counts.items(), *optional.items()]:
            if value is None and key in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fix = "a whole number >= 1" + (" or null" if key in optional else " or auto" if key == "val_every" else "")
                raise ConfigError(f"trainer.{key}={value}: must be {fix}")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 1  # the epoch in progress (1-based)
    batch: int = 0  # batches of that epoch already trained on
    step: int = 0  # optimizer steps so far
    best_miou: float | None = None
    best_epoch: int | None = None
    pending_validation: int | None = None  # an epoch trained but not yet validated (last.pt is written before validating)
    history: list[dict[str, Any]] = field(default_factory=list)
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    train_images: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0  # over all sessions of a resumed run, up to the last checkpoint


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; ``last.pt`` holds the state to resume from."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def stop_signals() -> Iterator[dict[str, int]]:
    """Record SIGTERM/SIGINT instead of dying mid-step; the loop checks after each optimizer step."""
    received: dict[str, int] = {}

    def handler(signum: int, frame: Any) -> None:
        received["signum"] = signum
        log.warning("received %s: finishing the current step, then saving last.pt", signal.Signals(signum).name)

    previous = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread (e.g. some launchers): leave signals alone
        pass
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class Trainer:
    """Trains the objects ``build`` made (``Components``) as ``settings`` say; writes checkpoints into
    ``run_dir`` (each holding ``config``, the resolved run config) and logs through ``run_log``."""

    def __init__(self, components: Components, settings: TrainerSettings, run_log: RunLog, run_dir: Path, config: dict[str, Any]) -> None:
        device = components.device
        self.components, self.settings, self.run_log, self.run_dir, self.config = components, settings, run_log, Path(run_dir), config
        self.model, self.loss_fn, self.optimizer, self.scheduler = components.model, components.loss_fn, components.optimizer, components.scheduler
        self.train_loader, self.val_loader, self.device = components.train_loader, components.val_loader, device
        self.state = TrainState()
        self.session_start, self.wall_before = time.perf_counter(), 0.0  # fit() restarts the clock
        self.batches_per_epoch = len(self.train_loader)  # before a mid-epoch resume shortens the sampler
        self.sliding_window = sliding_window_from(settings.val_mode, settings.window, settings.stride)
        self.dtype = PRECISIONS[settings.precision]
        # Autocast runs on CUDA; on the CPU only bf16 is supported by torch. One context for training and validation.
        self.autocast_enabled = self.dtype != torch.float32 and (device.type == "cuda" or self.dtype == torch.bfloat16)
        if self.dtype == torch.float16 and device.type != "cuda":
            log.warning("trainer.precision=16 needs CUDA; training in float32 on the CPU")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16 and device.type == "cuda")
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        if settings.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if settings.compile:
            own_compiler_cache()
        self.forward_model = torch.compile(self.model) if settings.compile else self.model
        self.warned_single_class = False
        self.progress_label = ""  # "job 3 " under a multirun launcher (set by segtrain.run.train)
        self.first_speed, self.warned_contention = 0.0, False
        self.last_postfix = ""
        self.samples = fixed_samples(self.val_loader.dataset, settings.log_images)  # the same ones at every validation

    # ----------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train until ``max_epochs`` (or ``max_steps``) or ``max_time``, whichever comes first,
        validating every ``val_every`` epochs and after the last."""
        state, settings = self.state, self.settings
        self.session_start, self.wall_before = time.perf_counter(), state.wall_seconds
        with stop_signals() as received:
            if state.pending_validation is not None:  # resumed after a stop during validation: redo it
                self.validate_pending(received)
            self.track_time()
            while state.epoch <= self.max_epochs and not self.reached_limit():
                with self.out_of_memory_names("dataset.batch_size", self.train_loader.batch_size):
                    self.train_one_epoch(received)
                trained = time.perf_counter()
                finished_epoch = state.epoch
                last = finished_epoch == self.max_epochs or self.reached_limit()
                state.epoch, state.batch = state.epoch + 1, 0
                if finished_epoch % self.components.val_every == 0 or last:
                    state.pending_validation = finished_epoch
                if settings.save_checkpoints:  # the epoch's training is safe before validation starts
                    self.save(improved=False)
                if state.pending_validation is not None:
                    self.validate_pending(received)
                    self.track_time(reserve=time.perf_counter() - trained)  # the next validation is expected to take as long
                self.run_log.flush()
                if received and not last:
                    self.stop(received["signum"])
        metrics = self.summary(finished=True)
        log.info("stopped at %s after %d steps, %.0f s", metrics["stopped_by"], state.step, metrics["wall_seconds"])
        self.run_log.write_metrics(metrics)
        return metrics

    @contextlib.contextmanager
    def out_of_memory_names(self, key: str, batch_size: int | None) -> Iterator[None]:
        """An out-of-memory error becomes a TrainingError naming the batch size, precision and what to try."""
        try:
            yield
        except RuntimeError as error:  # torch.OutOfMemoryError (CUDA) is one; the CPU allocator raises a plain one
            cuda = isinstance(error, torch.OutOfMemoryError)
            if not cuda and "can't allocate memory" not in str(error) and "not enough memory" not in str(error):
                raise
            where = "CUDA" if cuda and self.device.type == "cuda" else "host (CPU)"
            smaller = max(1, (batch_size or 2) // 2)
            precision = self.settings.precision
            cheaper = " or trainer.precision=bf16" if precision == "32" else ""
            raise TrainingError(
                f"{where} out of memory at epoch {self.state.epoch}, step {self.state.step + 1} with {key}={batch_size} and "
                f"trainer.precision={precision}: lower {key} (e.g. {key}={smaller}"
                + (f"; trainer.accumulate={2 * self.settings.accumulate} keeps the images per optimizer step" if key == "dataset.batch_size" else "")
                + f"){cheaper}, or use a smaller dataset.size or model"
            ) from None

    def train_one_epoch(self, received: dict[str, int]) -> None:
        state, settings, model = self.state, self.settings, self.forward_model
        model.train()
        sampler: EpochSampler = self.train_loader.sampler  # type: ignore[assignment]
        sampler.set_epoch(state.epoch, skip_batches=state.batch)
        images_seen, start = 0, time.perf_counter()
        batches_in_epoch = self.batches_per_epoch
        # The last logged values stay on the bar until this epoch logs its own.
        bar = progress_bar(
            self.train_loader, f"{self.progress_label}epoch {state.epoch}", settings.progress_bar, batches_in_epoch, state.batch,
            self.last_postfix,
        )
        micro_batches, finite = 0, None
        for images, masks in bar:
            images = images.to(self.device, non_blocking=True).to(memory_format=self.memory_format)
            masks = masks.to(self.device, non_blocking=True)  # values checked on the CPU by the loader (MaskCheck)
            with self.autocast_context():
                outputs = model(images)
                loss, terms = loss_terms(self.loss_fn, outputs, masks)
            state.batch += 1
            images_seen += images.shape[0]
            # No host read between forward and backward: whether the loss is finite is recorded on
            # the device here and read once per optimizer step, after backward (optimizer_step_is_finite).
            self.scaler.scale(loss / settings.accumulate).backward()
            finite = finite_terms(loss, terms) if finite is None else finite & finite_terms(loss, terms)
            micro_batches += 1
            if micro_batches < settings.accumulate and state.batch < batches_in_epoch:
                continue
            micro_batches = 0
            if not self.optimizer_step_is_finite(finite):
                self.skip_bad_step(finite, terms)
                finite = None
                continue
            finite = None
            state.bad_steps_in_a_row = 0
            self.track_time()  # before the scheduler steps: with trainer.max_time the rate follows the time used
            grad_norm = self.optimizer_step()
            state.step += 1
            if state.step % settings.log_every == 0:
                speed = images_seen / (time.perf_counter() - start)
                self.log_step(loss, terms, grad_norm, speed, bar)
            if settings.ckpt_every_steps and state.step % settings.ckpt_every_steps == 0 and settings.save_checkpoints:
                self.save(improved=False)
            if received:
                self.count_throughput(images_seen, start)
                self.stop(received["signum"])
            if self.reached_limit():
                break
        self.count_throughput(images_seen, start)

    def count_throughput(self, images_seen: int, start: float) -> None:
        self.state.train_images += images_seen
        self.state.train_seconds += time.perf_counter() - start

    def optimizer_step(self) -> torch.Tensor | None:
        """Unscale, clip, step, schedule; returns the gradient norm when it was computed."""
        grad_norm = None
        clip = self.settings.clip_grad_norm
        if clip or (self.state.step + 1) % self.settings.log_every == 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def log_step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor | None, speed: float, bar: tqdm) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        names = ["train/loss", *(f"train/loss/{name}" for name in terms if len(terms) > 1)]
        tensors = [loss.detach(), *(terms.values() if len(terms) > 1 else [])]
        if grad_norm is not None:
            names.append("train/grad_norm")
            tensors.append(grad_norm)
        # A logging step's one read back to the host, for all its values at once.
        values = dict(zip(names, torch.stack([value.float() for value in tensors]).tolist()))
        values.update({"train/lr": lr, "train/images_per_second": speed})
        values.update(system_scalars(self.device))  # system/gpu_memory_gb on CUDA
        self.run_log.scalars(self.state.step, values)
        self.warn_if_cpu_contended(speed)
        # The bar's one speed is this, images/s as logged (train/images_per_second); kept into the next epoch's bar.
        self.last_postfix = f"loss={values['train/loss']:.4f}, lr={lr:.2e}, img/s={speed:.1f}"
        bar.set_postfix_str(self.last_postfix)

    def warn_if_cpu_contended(self, speed: float) -> None:
        """Once per run on the CPU: training fell below half its first logged speed while the load
        average exceeds the cores, the mark of more threads than cores (other processes, or torch's
        default of one thread per core under a parallel launcher)."""
        if self.device.type != "cpu" or self.warned_contention:
            return
        self.first_speed = self.first_speed or speed
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if speed < 0.5 * self.first_speed and load > cores:
            self.warned_contention = True
            log.warning(
                "training slowed to %.1f images/s from %.1f with load average %.1f on %d cores: more threads than cores "
                "compete; set OMP_NUM_THREADS (or torch.set_num_threads) to at most the free cores, e.g. "
                "OMP_NUM_THREADS=1 for parallel jobs", speed, self.first_speed, load, cores,
            )

    def optimizer_step_is_finite(self, finite: torch.Tensor) -> bool:
        """Whether every loss term of this optimizer step's micro-batches was finite, on every process.

        The training step's one read back to the host, after backward: a CUDA step's
        forward and backward are queued without waiting for it. Under DDP the processes
        agree (a minimum over them), so all skip or all step.
        """
        everywhere = finite.all()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everywhere = everywhere.to(torch.int32)
            torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
        return bool(everywhere.item())

    def skip_bad_step(self, finite: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Drop the step's gradients (the optimizer does not step), log which term went bad, stop after too many."""
        state = self.state
        state.bad_steps_in_a_row += 1
        state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        flags = finite.tolist()  # read only on this rare path: [total, *terms]
        bad = [name for name, ok in zip(terms, flags[1:]) if not ok] or (["another process's loss"] if all(flags) else list(terms))
        log.warning("step %d: non-finite loss in %s; step skipped (%d in a row)", state.step + 1, ", ".join(bad), state.bad_steps_in_a_row)
        self.run_log.scalars(state.step, {"train/skipped_steps": state.skipped_steps})
        if state.bad_steps_in_a_row >= self.settings.max_bad_steps:
            raise TrainingError(
                f"{state.bad_steps_in_a_row} non-finite losses in a row (terms: {', '.join(bad)}; "
                f"trainer.max_bad_steps={self.settings.max_bad_steps}); lower optimizer.lr, set trainer.clip_grad_norm, "
                "or check the data for NaN values"
            )

    def stop(self, signum: int) -> None:
        """Save last.pt at this step boundary and leave the loop."""
        path = self.save(improved=False) if self.settings.save_checkpoints else None
        self.run_log.flush()
        raise Interrupted(signum, path)

    # ----------------------------------------------------------- validation
    def validate_pending(self, received: dict[str, int]) -> None:
        """Validate the epoch last.pt says is pending. A stop request during validation leaves at
        once: last.pt, written before validation, holds the trained epoch and redoes it on resume."""
        epoch = self.state.pending_validation
        with self.out_of_memory_names("dataset.val_batch_size", self.val_loader.batch_size):
            result = self.validate(epoch, stop_requested=lambda: bool(received))
        if result is None:
            self.run_log.flush()
            raise Interrupted(received["signum"], self.run_dir / "last.pt" if self.settings.save_checkpoints else None)

    def validate(self, epoch: int, stop_requested: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """Evaluate, log at the global step, track the best model, save checkpoints; None when
        ``stop_requested`` turned true before the end (nothing logged or saved)."""
        state = self.state
        components = self.components
        metrics = evaluate(
            self.forward_model, self.loss_fn, self.val_loader, self.device, components.num_classes, components.ignore_index,
            self.autocast_context, self.sliding_window,
            progress=f"{self.progress_label}val {epoch}" if self.settings.progress_bar else None, stop_requested=stop_requested,
            keep=self.samples[0] if self.samples else None,
        )
        if metrics is None:
            return None
        state.pending_validation = None
        self.warn_if_single_class(metrics)
        result = {"epoch": epoch, "step": state.step, **named_metrics(metrics, components.class_names)}
        scalars = {"val/loss": result["loss"], "val/mIoU": result["mIoU"], "val/acc": result["acc"], "val/dice": result["dice"]}
        scalars.update({f"val/IoU/{name}": iou for name, iou in result["IoU"].items() if not math.isnan(iou)})
        self.run_log.scalars(state.step, scalars)
        self.run_log.confusion_matrix(state.step, metrics["confusion_matrix"])
        self.log_predictions(metrics["kept"])
        per_class = ", ".join(f"{name} {iou:.3f}" for name, iou in result["IoU"].items())
        log.info("epoch %d step %d: val loss %.4f, mIoU %.4f, acc %.4f (IoU: %s)", epoch, state.step, result["loss"], result["mIoU"], result["acc"], per_class)
        state.history.append(result)
        improved = (state.best_miou is None or result["mIoU"] > state.best_miou) and is_finite_model(self.model)
        if improved:
            state.best_miou, state.best_epoch = result["mIoU"], epoch
        if self.settings.save_checkpoints:
            self.save(improved)
        self.run_log.write_metrics(self.summary(finished=False))
        return result

    @torch.no_grad()
    def log_predictions(self, kept: dict[int, torch.Tensor]) -> None:
        """Picture the fixed validation samples with the current predictions (``val/predictions``):
        those validation kept (``kept``, by dataset index), others (another DDP process's shard) predicted here."""
        if self.samples is None:
            return
        indices, images, masks = self.samples
        self.model.eval()  # the uncompiled model: a batch of another size would make torch.compile recompile
        with self.autocast_context():  # one sample at a time, as validation sees it: sizes may differ
            predicted = [
                kept[index] if index in kept else classes_from_logits(segment_logits(self.model, image[None].to(self.device), self.sliding_window))[0]
                for index, image in zip(indices, images)
            ]
        self.run_log.predictions(self.state.step, images, masks, predicted)

    def warn_if_single_class(self, metrics: dict[str, Any]) -> None:
        predicted = metrics["predicted_classes"]
        if len(predicted) == 1 and not self.warned_single_class:
            self.warned_single_class = True
            log.warning(
                "validation predicts class %r everywhere; if this persists, check that dataset.num_classes, the loss "
                "(sigmoid or softmax) and the masks agree (e.g. dataset.mask_values for 0/255 masks)",
                self.components.class_names[predicted[0]],
            )

    def autocast_context(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, self.dtype, enabled=self.autocast_enabled)

    # ----------------------------------------------------------- checkpoints
    def save(self, improved: bool) -> Path:
        self.state.wall_seconds = self.wall_seconds()
        checkpoint = training_checkpoint(self.model, self.optimizer, self.scheduler, self.scaler, asdict(self.state), self.config)
        path = self.run_dir / "last.pt"
        save_checkpoint(path, checkpoint)
        if improved:
            save_checkpoint(self.run_dir / "best.pt", checkpoint)
        return path

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Restore everything ``save`` wrote: weights, optimizer, scheduler, scaler, state and RNGs."""
        self.state = TrainState(**restore_training(checkpoint, self.model, self.optimizer, self.scheduler, self.scaler))

    # ----------------------------------------------------------- bookkeeping
    @property
    def max_epochs(self) -> int:
        if self.settings.max_steps is not None:
            return math.ceil(self.settings.max_steps / self.components.steps_per_epoch)
        return self.settings.max_epochs

    def reached_max_steps(self) -> bool:
        return self.settings.max_steps is not None and self.state.step >= self.settings.max_steps

    def out_of_time(self) -> bool:
        budget = self.components.time_budget
        return budget is not None and budget.exhausted()

    def reached_limit(self) -> bool:
        """``max_steps`` or ``max_time`` reached (``max_epochs`` is the loop's own bound)."""
        return self.reached_max_steps() or self.out_of_time()

    def stopped_by(self) -> str:
        return "max_time" if self.out_of_time() else "max_steps" if self.reached_max_steps() else "max_epochs"

    def track_time(self, reserve: float | None = None) -> None:
        """``trainer.max_time``: the seconds used so far (and, after a validation, the time set aside
        for the next) into the time budget. Under DDP every process takes the largest value of any
        (one small all_reduce per step, only with a budget), so all follow one schedule and stop together."""
        budget = self.components.time_budget
        if budget is None:
            return
        values = torch.tensor([self.wall_seconds(), budget.reserve if reserve is None else reserve], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            values = values.to(self.device)
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        budget.used, budget.reserve = values.tolist()

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.session_start

    def summary(self, finished: bool) -> dict[str, Any]:
        """The content of metrics.json (``finished`` is false while the run is in progress)."""
        state = self.state
        return {
            "best_miou": state.best_miou,
            "best_epoch": state.best_epoch,
            "final": state.history[-1] if state.history else None,
            "epochs": state.epoch - 1,
            "steps": state.step,
            "wall_seconds": self.wall_seconds(),
            "train_seconds": state.train_seconds,
            "images_per_second": state.train_images / state.train_seconds if state.train_seconds > 0 else None,
            "skipped_steps": state.skipped_steps,
            "max_time": self.components.time_budget.seconds if self.components.time_budget else None,
            "stopped_by": self.stopped_by() if finished else None,
            "history": state.history,
            "finished": finished,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    ignore_index: int | None,
    autocast: Any = contextlib.nullcontext,
    sliding_window: SlidingWindow | None = None,
    progress: str | None = None,
    stop_requested: Callable[[], bool] | None = None,
    keep: list[int] | None = None,
) -> dict[str, Any] | None:
    """Validation loss (mean over samples) and metrics from one confusion matrix over the whole split.

    Whole images go through the model at once, or window by window with ``sliding_window``;
    ``progress`` labels a progress bar (None: no bar). ``stop_requested`` is asked before each
    batch; when it says so, None is returned at once (a scheduler's grace period is short).
    The predicted classes of the dataset indices in ``keep`` come back under ``kept`` (on the
    CPU; those of this process's shard), for the pictures: no second forward pass.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index, device)
    loss_sum, samples = torch.zeros((), device=device), 0
    order = list(loader.sampler) if keep else []  # the dataset index of each validated sample, in order
    kept: dict[int, torch.Tensor] = {}
    for images, masks in progress_bar(loader, progress or "", progress is not None, len(loader)):
        if stop_requested is not None and stop_requested():
            return None
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with autocast():
            logits = segment_logits(model, images, sliding_window)
            loss_sum += loss_terms(loss_fn, logits, masks)[0].detach().float() * images.shape[0]
        predicted = classes_from_logits(logits)
        if keep:
            kept.update({order[samples + i]: predicted[i].cpu() for i in range(images.shape[0]) if order[samples + i] in keep})
        samples += images.shape[0]
        confusion.update(predicted, masks)
    confusion.reduce_across_processes()
    loss_sum, samples = reduce_sum(loss_sum, samples)  # DDP: the mean over the whole split, not this process's shard
    predicted_classes = torch.nonzero(confusion.matrix.sum(0)).flatten().tolist()
    return {
        "loss": float(loss_sum) / max(samples, 1), **confusion.compute(), "predicted_classes": predicted_classes,
        "confusion_matrix": confusion.matrix.cpu(), "kept": kept,
    }


def progress_bar(batches: Any, label: str, enabled: bool, total: int, initial: int = 0, postfix: str = "") -> tqdm:
    """A batch bar without tqdm's own rate: the one speed shown is the postfix's images/s."""
    return tqdm(
        batches, desc=label, total=total, initial=initial, disable=not enabled, leave=False, dynamic_ncols=True,
        postfix=postfix or None, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
    )


def reduce_sum(loss_sum: torch.Tensor, samples: int) -> tuple[torch.Tensor, int]:
    """Sums over all processes (DDP); unchanged without torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return loss_sum, samples
    totals = torch.stack([loss_sum.double(), torch.tensor(float(samples), dtype=torch.float64, device=loss_sum.device)])
    torch.distributed.all_reduce(totals)
    return totals[0], int(totals[1])


def named_metrics(metrics: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """Metrics with per-class lists turned into ``{class name: value}``."""
    return {
        "loss": metrics["loss"],
        "acc": metrics["acc"],
        "mIoU": metrics["mIoU"],
        "dice": metrics["dice"],
        "IoU": dict(zip(class_names, metrics["IoU"])),
        "Dice": dict(zip(class_names, metrics["Dice"])),
        "class_acc": dict(zip(class_names, metrics["class_acc"])),
    }


def finite_terms(loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Whether the total and each term are finite, as a bool vector on the device (nothing read back)."""
    return torch.isfinite(torch.stack([loss.detach().float(), *(term.float() for term in terms.values())]))


def own_compiler_cache() -> None:
    """torch.compile loads the code it compiled from ``/tmp/torchinductor_<user>`` by default, a folder
    another user of the machine could create first and fill. Unless ``TORCHINDUCTOR_CACHE_DIR`` is
    set, segtrain points it into the user's own cache (``$SEGTRAIN_CACHE_DIR/inductor``)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        from segtrain.cache import cache_root

        folder = cache_root() / "inductor"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        log.info("trainer.compile: torch.compile's cache in %s (TORCHINDUCTOR_CACHE_DIR)", folder)


def is_finite_model(model: nn.Module) -> bool:
    """All weights finite (one read back to the host, at validation)."""
    return bool(torch.stack([torch.isfinite(parameter).all() for parameter in model.parameters()]).all())
