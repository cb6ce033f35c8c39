"""Run a job from a composed config: what ``train.py`` calls (``mode=train | eval | predict | export | audit``)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from segtrain import distributed
from segtrain.build import Components, build, build_audit
from segtrain.checkpoint import load_checkpoint, load_model_state
from segtrain.devices import ConfigError
from segtrain.host_memory import keep_freed_memory_for_cpu_training
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
        return evaluate_checkpoint(cfg, Path(run_dir))
    if mode == "audit":
        return audit_only(cfg)
    if mode == "predict":
        return predict_checkpoint(cfg, Path(run_dir))
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
    settings = TrainerSettings(**{key: value for key, value in trainer_cfg.items() if key not in distributed.DISTRIBUTED_KEYS})
    if not distributed.is_main():  # rank 0 alone writes checkpoints and shows the progress bar
        settings.save_checkpoints, settings.progress_bar = False, False
    return Trainer(
        components.model, components.loss_fn, components.optimizer, components.scheduler,
        components.train_loader, components.val_loader, components.device,
        components.num_classes, components.ignore_index, components.class_names,
        settings, run_log, run_dir, config,
    )


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
        with logging_redirect_tqdm():
            metrics = trainer.fit()
        run_log.hparams_results(metrics["steps"], metrics)
    finally:
        run_log.close()
    log.info(
        "done: best val mIoU %.4f (epoch %s), %.1f s, %.1f images/s",
        metrics["best_miou"], metrics["best_epoch"], metrics["wall_seconds"], metrics["images_per_second"] or 0,
    )
    return float(metrics["best_miou"])


def model_from_checkpoint(cfg: DictConfig) -> tuple[Components, Path, SlidingWindow | None]:
    """The run's objects with the weights of ``resume`` (strict), the checkpoint's path, and the
    sliding window of ``trainer.val_mode``, as validation used them."""
    path = checkpoint_path(cfg.resume)
    components, _ = build(cfg)
    load_model_state(components.model, load_checkpoint(path)["model"], strict=True)
    return components, path, sliding_window_from(cfg.trainer.val_mode, cfg.trainer.get("window"), cfg.trainer.get("stride"))


def evaluate_checkpoint(cfg: DictConfig, run_dir: Path) -> float:
    """``mode=eval resume=<checkpoint>``: per-class IoU, Dice and accuracy on the validation split."""
    if not cfg.get("resume"):
        raise ConfigError("mode=eval needs a checkpoint: add resume=<path to best.pt or last.pt, or a run dir>")
    components, path, sliding = model_from_checkpoint(cfg)
    metrics = evaluate(
        components.model, components.loss_fn, components.val_loader, components.device, components.num_classes,
        components.ignore_index, sliding_window=sliding,
    )
    result: dict[str, Any] = {"checkpoint": str(path), **named_metrics(metrics, components.class_names)}
    table = format_table(result)
    print(table)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("evaluation of %s written to %s", path, run_dir / "eval.json")
    return float(result["mIoU"])


def format_table(result: dict[str, Any]) -> str:
    """Per-class IoU and Dice, then the means and pixel accuracy, as a plain-text table."""
    names = list(result["IoU"])
    width = max(12, *(len(name) for name in names))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Dice':>7}", "-" * (width + 18)]
    for name in names:
        iou, dice = result["IoU"][name], result["Dice"][name]
        lines.append(f"{name:<{width}}  {iou:7.4f}  {dice:7.4f}")
    lines.append("-" * (width + 18))
    lines.append(f"{'mean':<{width}}  {result['mIoU']:7.4f}  {result['dice']:7.4f}")
    lines.append(f"{'pixel acc':<{width}}  {result['acc']:7.4f}")
    lines.append(f"{'val loss':<{width}}  {result['loss']:7.4f}")
    return "\n".join(lines)


def predict_checkpoint(cfg: DictConfig, run_dir: Path) -> float:
    """``mode=predict resume=<checkpoint> predict.input=<folder>``: masks and overlays; returns the image count."""
    from segtrain.predict import output_dir_for, predict_folder

    if not cfg.get("resume") or not cfg.get("predict", {}).get("input"):
        raise ConfigError("mode=predict needs resume=<checkpoint or run dir> and predict.input=<folder of images>")
    components, _, sliding = model_from_checkpoint(cfg)
    palette = resolve_palette(cfg.dataset.get("palette"), components.val_loader.dataset, components.num_classes)
    written = predict_folder(
        components, Path(cfg.predict.input), output_dir_for(cfg, run_dir), int(cfg.dataset.batch_size), sliding, palette
    )
    return float(len(written) // 2)
