"""Run a job from a composed config: what ``train.py`` calls (``mode=train | eval | predict | export | audit``)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.contrib.logging import logging_redirect_tqdm

from segtrain import distributed
from segtrain.build import Components, build, build_audit
from segtrain.checkpoint import load_checkpoint, load_model_state
from segtrain.errors import ConfigError
from segtrain.host_memory import keep_freed_memory_for_cpu_training
from segtrain.overrides import split_override, unknown_trainer_keys
from segtrain.run_log import RunLog
from segtrain.inference import SlidingWindow, sliding_window_from
from segtrain.trainer import Trainer, TrainerSettings, evaluate, named_metrics
from segtrain.visualize import resolve_palette

log = logging.getLogger(__name__)


def main(cfg: DictConfig, run_dir: str | Path) -> float:
    """Dispatch on ``mode``; returns the best val mIoU (train) or the checkpoint's val mIoU (eval)."""
    mode = cfg.get("mode", "train")
    if mode == "train":
        if distributed.needs_spawn(cfg):  # device_list=[0,1,...] or trainer.cpu_processes=N: one DDP worker each
            return distributed.launch(cfg, run_dir, train)
        if distributed.under_torchrun():
            with distributed.process_group(cfg):
                return train(cfg, run_dir)
        return train(cfg, run_dir)
    if mode == "eval":
        return evaluate_checkpoint(cfg)
    if mode == "audit":
        return audit_only(cfg)
    if mode == "predict":
        return predict_checkpoint(cfg)
    if mode == "export":
        from segtrain.export import export_checkpoint  # onnx and onnxruntime only when exporting

        return export_checkpoint(cfg)
    raise ConfigError(f"mode={mode}: unknown mode; known: audit, eval, export, predict, train")


def audit_only(cfg: DictConfig) -> float:
    """``mode=audit``: only the pre-flight data audit; prints the per-class pixel table (no model, no training)."""
    report = build_audit(cfg)
    if report is None:
        print(f"dataset={cfg.dataset.get('name')}: generated on the fly, no files to audit")
        return float("nan")
    print(report.table())
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"data audit passed: {sum(report.files.values())} files in {report.seconds:.1f} s ({report.cached_files} from the cache)")
    return float("nan")


def job_overrides() -> list[str]:
    """The job's command-line overrides (``optimizer.lr=0.01``), for TensorBoard's HParams; none outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def checkpoint_path(resume: str) -> Path:
    """``resume`` names a checkpoint file or a run dir (then its ``last.pt``)."""
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no checkpoint there; give a .pt file or a run dir that holds last.pt")
    return path


class SilentRunLog:
    """The run log of DDP ranks other than 0: every call does nothing."""

    seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def make_trainer(cfg: DictConfig, components: Components, run_cfg: DictConfig, run_dir: Path, run_log: RunLog) -> Trainer:
    config = OmegaConf.to_container(run_cfg, resolve=True)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    unknown = unknown_trainer_keys(trainer_cfg)
    if unknown:
        raise ConfigError(unknown)
    settings = TrainerSettings(**{key: value for key, value in trainer_cfg.items() if key not in distributed.DISTRIBUTED_KEYS})
    if not distributed.is_main():  # rank 0 alone writes checkpoints and shows the progress bar
        settings.save_checkpoints, settings.progress_bar = False, False
    trainer = Trainer(
        components.model, components.loss_fn, components.optimizer, components.scheduler,
        components.train_loader, components.val_loader, components.device,
        components.num_classes, components.ignore_index, components.class_names,
        settings, run_log, run_dir, config,
    )
    from segtrain.sweep import in_multirun

    if in_multirun():  # parallel jobs' bars: say whose is whose
        from hydra.core.hydra_config import HydraConfig

        trainer.progress_label = f"job {HydraConfig.get().job.num} "
    return trainer


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """Train as configured, write everything into the run dir, return the best val mIoU.

    With ``resume=<checkpoint or run dir>`` the run continues where the checkpoint left
    off, writing into the checkpoint's run dir.
    """
    run_dir = Path(run_dir)
    checkpoint = None
    if cfg.get("resume"):
        path = checkpoint_path(cfg.resume)
        checkpoint = load_checkpoint(path)
        run_dir = path.parent
        state = checkpoint["state"]
        log.info("resuming from %s (epoch %d, batch %d, step %d); writing into %s", path, state["epoch"], state["batch"], state["step"], run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    components, run_cfg = build(cfg)
    # A CPU setting, made here rather than in build(): it changes the whole process's allocator.
    keep_freed_memory_for_cpu_training(components.device.type, bool(cfg.trainer.get("keep_freed_memory", True)))
    if distributed.is_main():
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(run_cfg, resolve=True))
    palette = resolve_palette(cfg.dataset.get("palette"), components.val_loader.dataset, components.num_classes)
    run_log = RunLog(
        run_dir, components.class_names, palette, cfg.trainer.log_image_size,
        # On resume, TensorBoard drops events logged after the checkpoint: curves get no duplicate points.
        purge_step=checkpoint["state"]["step"] + 1 if checkpoint else None,
    ) if distributed.is_main() else SilentRunLog()  # one TensorBoard writer and metrics.json per run: rank 0's
    if checkpoint is None:
        run_log.text("config", "```\n" + OmegaConf.to_yaml(run_cfg, resolve=True) + "\n```")
        run_log.hparams(OmegaConf.to_container(run_cfg, resolve=True), job_overrides())
    trainer = make_trainer(cfg, components, run_cfg, run_dir, run_log)
    if checkpoint is not None:
        trainer.load(checkpoint)
    log.info("run dir: %s; %d optimizer steps", run_dir, components.total_steps)
    processes = distributed.world().size
    if processes > 1:
        log.info(
            "DDP: %d processes, dataset.batch_size=%d per process, global batch %d",
            processes, cfg.dataset.batch_size, processes * cfg.dataset.batch_size * cfg.trainer.accumulate,
        )
    try:
        # Log lines (and warnings, routed through logging) are written above the bar, never glued onto it.
        logging.captureWarnings(True)
        with logging_redirect_tqdm(loggers=[logging.getLogger(), logging.getLogger("py.warnings")]):
            metrics = trainer.fit()
        run_log.hparams_results(metrics["steps"], metrics)
    finally:
        run_log.close()
    log.info(
        "done: best val mIoU %.4f (epoch %s), %.1f s, %.1f images/s",
        metrics["best_miou"], metrics["best_epoch"], metrics["wall_seconds"], metrics["images_per_second"] or 0,
    )
    if distributed.is_main():  # the last line: where to look
        best = run_dir / "best.pt"
        log.info("run dir: %s; best checkpoint: %s; curves: tensorboard --logdir %s", run_dir, best if best.exists() else "none", run_dir)
    return float(metrics["best_miou"])


# When a checkpoint is evaluated, used for prediction or exported, the mode's own keys come from the
# command line, and of the run's config only where the data is, how it is batched and loaded, how
# inference slides and on which device.
MODE_KEYS = ("mode", "resume", "device_list", "predict", "export", "eval")
INFERENCE_KEYS = (
    "dataset.root", "dataset.batch_size", "dataset.val_batch_size", "dataset.num_workers",
    "trainer.val_mode", "trainer.window", "trainer.stride",
)
# Groups whose values decide what inference computes: an override of these that differs from the
# checkpoint is refused; a differing training-only key (optimizer, scheduler, epochs, ...) is listed and ignored.
INFERENCE_GROUPS = ("model", "dataset", "loss")


def inference_checkpoint(cfg: DictConfig) -> Path:
    """``resume`` for eval, predict and export: a checkpoint file, or a run dir's ``best.pt``
    (its ``last.pt`` when the run has no best yet)."""
    if not cfg.get("resume"):
        raise ConfigError(f"mode={cfg.mode} needs a checkpoint: add resume=<path to best.pt or last.pt, or a run dir>")
    resume = Path(cfg.resume)
    for candidate in [resume] if resume.is_file() else [resume / "best.pt", resume / "last.pt"]:
        if candidate.is_file():
            log.info("mode=%s: checkpoint %s", cfg.mode, candidate)
            return candidate
    raise ConfigError(f"resume={resume}: no checkpoint there; give a .pt file or a run dir that holds best.pt or last.pt")


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def inference_config(cfg: DictConfig, stored: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The config the checkpoint was trained with; from the command line ``cfg`` its ``MODE_KEYS``
    and, among ``overrides`` (the command line's ``key=value`` and ``group=option``), the
    ``INFERENCE_KEYS``. Another override that differs from the checkpoint's value is refused
    (model, dataset, loss) or listed in a warning and ignored (training-only keys), naming both values."""
    run_cfg = OmegaConf.create(stored)
    keys = [split_override(override)[0] for override in overrides]
    refused, ignored = [], []
    for key in keys:
        if key.startswith("hydra") or under(key, MODE_KEYS + INFERENCE_KEYS):
            continue
        given, trained = OmegaConf.select(cfg, key), OmegaConf.select(run_cfg, key)
        if isinstance(given, DictConfig) and isinstance(trained, DictConfig):  # a group: compare the option chosen
            given, trained = given.get("name", given.get("_target_")), trained.get("name", trained.get("_target_"))
        given, trained = (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value for value in (given, trained))
        if given != trained:
            (refused if key.split(".")[0] in INFERENCE_GROUPS else ignored).append(f"{key}={given} (the checkpoint: {trained})")
    if refused:
        raise ConfigError(
            f"mode={cfg.mode} uses the config the checkpoint was trained with; these overrides would change what it "
            f"computes: {', '.join(refused)}. Remove them; of model, dataset and loss only "
            f"{', '.join(key for key in INFERENCE_KEYS if key.startswith('dataset.'))} may change"
        )
    if ignored:
        log.warning("mode=%s: training settings on the command line are ignored (the checkpoint's apply): %s", cfg.mode, ", ".join(ignored))
    with open_dict(run_cfg):
        for key in [*MODE_KEYS, *(key for key in keys if under(key, INFERENCE_KEYS))]:
            OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key), merge=False)
    return run_cfg


@dataclass
class FromCheckpoint:
    """A checkpoint's run rebuilt for inference: its objects with its weights, the file, its contents, the config."""

    components: Components
    path: Path
    checkpoint: dict[str, Any]
    config: DictConfig


def model_from_checkpoint(cfg: DictConfig, overrides: list[str] | None = None) -> FromCheckpoint:
    """The run's objects rebuilt from the checkpoint's own config (``inference_config``; ``overrides``
    default to the command line's), with the checkpoint's weights (strict)."""
    path = inference_checkpoint(cfg)
    checkpoint = load_checkpoint(path)
    run_cfg = inference_config(cfg, checkpoint["config"], job_overrides() if overrides is None else overrides)
    components, _ = build(run_cfg)
    load_model_state(components.model, checkpoint["model"], strict=True)
    return FromCheckpoint(components, path, checkpoint, run_cfg)


def sliding_window_of(run_cfg: DictConfig) -> SlidingWindow | None:
    return sliding_window_from(run_cfg.trainer.val_mode, run_cfg.trainer.get("window"), run_cfg.trainer.get("stride"))


def evaluate_checkpoint(cfg: DictConfig) -> float:
    """``mode=eval resume=<checkpoint or run dir>``: per-class IoU, Dice and pixel accuracy on the
    validation split, as the run validated; ``eval.json`` beside the checkpoint (``eval/``)."""
    loaded = model_from_checkpoint(cfg)
    components, path, run_cfg = loaded.components, loaded.path, loaded.config
    metrics = evaluate(
        components.model, components.loss_fn, components.val_loader, components.device, components.num_classes,
        components.ignore_index, sliding_window=sliding_window_of(run_cfg),
    )
    result: dict[str, Any] = {"checkpoint": str(path), **named_metrics(metrics, components.class_names)}
    print(format_table(result))
    output = Path(cfg.get("eval", {}).get("output") or path.parent / "eval")
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("evaluation of %s written to %s", path, output / "eval.json")
    return float(result["mIoU"])


def format_table(result: dict[str, Any]) -> str:
    """Per-class IoU, Dice and pixel accuracy, then the means, overall pixel accuracy and the loss, as a plain-text table."""
    names = list(result["IoU"])
    width = max(12, *(len(name) for name in names))
    rule = "-" * (width + 29)
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Dice':>7}  {'acc':>7}", rule]
    for name in names:
        lines.append(f"{name:<{width}}  {result['IoU'][name]:7.4f}  {result['Dice'][name]:7.4f}  {result['class_acc'][name]:7.4f}")
    lines.append(rule)
    lines.append(f"{'mean':<{width}}  {result['mIoU']:7.4f}  {result['dice']:7.4f}")
    lines.append(f"{'pixel acc':<{width}}  {result['acc']:7.4f}")
    lines.append(f"{'val loss':<{width}}  {result['loss']:7.4f}")
    return "\n".join(lines)


def predict_checkpoint(cfg: DictConfig) -> float:
    """``mode=predict resume=<checkpoint or run dir> predict.input=<folder>``: masks and overlays
    (``predict.output``, default: ``predictions/`` beside the checkpoint); returns the image count."""
    from segtrain.predict import predict_folder

    if not cfg.get("predict", {}).get("input"):
        raise ConfigError("mode=predict needs predict.input=<folder of images> (and resume=<checkpoint or run dir>)")
    loaded = model_from_checkpoint(cfg)
    components, path, run_cfg = loaded.components, loaded.path, loaded.config
    palette = resolve_palette(run_cfg.dataset.get("palette"), components.val_loader.dataset, components.num_classes)
    output = Path(cfg.predict.get("output") or path.parent / "predictions")
    written = predict_folder(
        components, Path(cfg.predict.input), output, int(run_cfg.dataset.batch_size), sliding_window_of(run_cfg), palette
    )
    return float(len(written) // 2)
