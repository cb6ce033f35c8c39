"""What a run leaves for its user: TensorBoard event files and ``metrics.json``.

TensorBoard gets, all at the global optimizer step so that curves line up:
scalars (``train/...``, ``val/...``, ``system/...``), at each validation a picture of
fixed validation samples and the confusion-matrix heatmap, the resolved config as
text, and the HParams session (the job's overrides and a few key values, plus ``val/best_mIoU``,
``val/final_mIoU`` and ``val/final_loss``) so that ``tensorboard --logdir <sweep dir>``
compares the jobs of a sweep in one table.
"""
from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from segtrain import visualize
from segtrain.overrides import split_override

# The HParams metrics: one column each in TensorBoard's HParams table.
# Filed under val/, so that TensorBoard's Scalars tab, sorted by name, opens on train/ and val/ curves.
HPARAM_METRICS = ("val/best_mIoU", "val/final_mIoU", "val/final_loss")
# Shown in HParams after the job's own overrides: what tells runs apart at a glance.
KEY_HPARAMS = ("model.name", "dataset.name", "loss.name", "optimizer.lr", "dataset.batch_size", "trainer.max_epochs")

Method = TypeVar("Method", bound=Callable[..., Any])


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def timed(method: Method) -> Method:
    """Add the wall time of each call to ``self.seconds``: logging's cost, measured in every run."""

    @functools.wraps(method)
    def wrapper(self: RunLog, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    return wrapper  # type: ignore[return-value]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` -> ``{"optimizer.lr": 0.1}``; lists become their JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def hyperparameters(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The run's hyperparameters for TensorBoard's HParams tab: the job's command-line overrides,
    then the key values (:data:`KEY_HPARAMS`) not among them; each as its config text (``16``,
    ``0.006``, ``null``, ``true``: HParams would print numbers as ``16.000`` and drop None).

    An override of a config group (``loss=focal``) appears under the group's name; an override
    of a value appears under its key with the value as run.
    """
    flat = flatten(config)
    ordered: dict[str, Any] = {}
    for override in overrides:
        key, value = split_override(override)
        if not key.startswith("hydra"):
            ordered[key] = flat.get(key, value)
    ordered.update((key, flat[key]) for key in KEY_HPARAMS if key in flat and key not in ordered)
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in ordered.items()}


def system_scalars(device: torch.device) -> dict[str, float]:
    """``system/gpu_memory_gb`` (peak allocated so far) on CUDA; nothing elsewhere."""
    if device.type != "cuda":
        return {}
    return {"system/gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9}


def after_earlier_sessions(run_dir: Path) -> None:
    """Wait (at most a second) until a new event file's name sorts after the run's earlier ones.

    TensorBoard reads a run's event files in name order, and the name begins with the second it
    was created (then host, pid and a per-process counter, compared as text: "10" < "9"). A resume
    within the same second as the last session (in one process: a notebook, a test) would be read
    first, and the earlier session's events would then overwrite the purge."""
    stamps = [int(part) for part in (path.name.split(".")[3] for path in run_dir.glob("events.out.tfevents.*")) if part.isdigit()]
    if stamps and max(stamps) >= int(time.time()):
        time.sleep(max(0.0, max(stamps) + 1 - time.time()))


class RunLog:
    """TensorBoard writer (event files in the run dir itself) plus the ``metrics.json`` summary.

    ``seconds`` is the time spent in these methods, written to ``metrics.json`` as
    ``log_seconds`` (see benchmarks/README.md, "TensorBoard overhead").
    """

    def __init__(
        self,
        run_dir: Path,
        class_names: Sequence[str] = (),
        palette: np.ndarray | None = None,
        image_size: int = 128,
        purge_step: int | None = None,
    ) -> None:
        self.seconds = 0.0
        start = time.perf_counter()
        self.run_dir = Path(run_dir)
        self.class_names = list(class_names)
        self.palette = palette if palette is not None else visualize.default_palette(len(self.class_names))
        self.image_size = image_size
        # Flushed at each validation and on close; flush_secs bounds staleness in between.
        # purge_step (on resume): TensorBoard drops events from that step on that an earlier session wrote.
        if purge_step is not None:
            after_earlier_sessions(self.run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step, flush_secs=30)
        self.seconds += time.perf_counter() - start

    @timed
    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    @timed
    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)

    @timed
    def predictions(self, step: int, images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], predicted: Sequence[torch.Tensor]) -> None:
        """``val/predictions``: input | ground truth | prediction | overlay for each fixed sample, with a class legend."""
        arrays = [[tensor.detach().float().cpu().numpy() for tensor in tensors] for tensors in (images, masks, predicted)]
        panel = visualize.prediction_panel(*arrays, self.class_names, self.palette, self.image_size)
        self.writer.add_image("val/predictions", panel, step, dataformats="HWC")

    @timed
    def confusion_matrix(self, step: int, matrix: torch.Tensor | np.ndarray) -> None:
        """``val/confusion_matrix``: rows (true classes) normalised, class names on both axes."""
        heatmap = visualize.confusion_heatmap(np.asarray(torch.as_tensor(matrix).cpu()), self.class_names)
        self.writer.add_image("val/confusion_matrix", heatmap, step, dataformats="HWC")

    @timed
    def hparams(self, config: dict[str, Any], overrides: Sequence[str]) -> None:
        """Start the HParams session in the run's own event file (``add_hparams`` would make a subfolder)."""
        # The session's start alone, no experiment summary: TensorBoard then builds the experiment from
        # all sessions of the logdir, marks the hyperparameters that differ between them, and lists and
        # ticks those first (a written experiment would be listed alphabetically, constants first).
        _, session_start, _ = hparams_summaries(hyperparameters(config, overrides), dict.fromkeys(HPARAM_METRICS, 0.0))
        self.writer.file_writer.add_summary(session_start)

    @timed
    def hparams_results(self, step: int, metrics: dict[str, Any]) -> None:
        """The HParams metrics of a finished run, and the session's end (status: success)."""
        final = metrics.get("final") or {}
        values = dict(zip(HPARAM_METRICS, (metrics.get("best_miou"), final.get("mIoU"), final.get("loss"))))
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        _, _, session_end = hparams_summaries({}, {})
        self.writer.file_writer.add_summary(session_end)
        self.writer.flush()

    @timed
    def flush(self) -> None:
        self.writer.flush()

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """``metrics.json``, with ``log_seconds``: the time this run spent logging so far."""
        path = self.run_dir / "metrics.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(json_safe({**metrics, "log_seconds": self.seconds}), indent=2) + "\n")
        temporary.replace(path)  # readers never see a half-written file

    def close(self) -> None:
        self.writer.close()
