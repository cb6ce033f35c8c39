"""Run a job from a composed config: what ``train.py`` calls (``mode=train | eval | predict | export | audit``)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.contrib.logging import logging_redirect_tqdm

from segtrain import distributed, run_lock
from segtrain.build import Components, build, build_audit
from segtrain.checkpoint import load_checkpoint, load_weights, stored_config, stored_state
from segtrain.errors import ConfigError
from segtrain.host_memory import keep_freed_memory_for_cpu_training
from segtrain.overrides import split_override, unknown_trainer_keys
from segtrain.run_log import RunLog
from segtrain.schedules import describe
from segtrain.inference import SlidingWindow, sliding_window_from
from segtrain.trainer import Trainer, TrainerSettings, evaluate, named_metrics
from segtrain.visualize import resolve_palette

log = logging.getLogger(__name__)


def main(cfg: DictConfig, run_dir: str | Path) -> float:
    """Dispatch on ``mode``; returns the best val mIoU (train) or the checkpoint's val mIoU (eval)."""
    mode = cfg.get("mode", "train")
    if mode == "train":
        # One live run per run dir (the resumed run's dir on resume): a second one fails here, naming the first.
        owner = os.environ.get("RANK", "0") == "0"  # torchrun: rank 0 holds it; spawned DDP workers never get here
        owned = checkpoint_path(cfg.resume).parent if cfg.get("resume") else Path(run_dir)
        with run_lock.owning(owned, resuming=bool(cfg.get("resume"))) if owner else contextlib.nullcontext():
            if distributed.needs_spawn(cfg):  # device_list=[0,1,...] or trainer.cpu_processes=N: one DDP worker each
                if not cfg.get("resume"):
                    trainer_settings(cfg)  # before spawning: a bad trainer key is one error, not one per rank
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

        return export_checkpoint(cfg, model_from_checkpoint)
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


def job_overrides() -> list[str] | None:
    """The job's command-line overrides (``optimizer.lr=0.01``); None outside Hydra (a config built in Python)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def differing_keys(cfg: DictConfig, stored: dict[str, Any], prefix: str = "") -> list[str]:
    """The leaf keys whose value in ``cfg`` differs from ``stored`` (a config built in Python has no
    command line to tell what was changed). Values the builder resolves (``auto``, null) are not differences."""
    keys = []
    for key, value in stored.items():
        path = f"{prefix}{key}"
        given = OmegaConf.select(cfg, path, default=None)
        if isinstance(value, dict) and isinstance(given, DictConfig):
            keys += differing_keys(cfg, value, path + ".")
        elif given is not None and given != "auto" and (OmegaConf.to_container(given) if OmegaConf.is_config(given) else given) != value:
            keys.append(path)
    return keys


def checkpoint_path(resume: str) -> Path:
    """``resume`` (mode=train) names a checkpoint file or a run dir (then its ``last.pt``)."""
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no checkpoint there; give a .pt file or a run dir that holds last.pt")
    return path


@contextlib.contextmanager
def logging_into(path: Path) -> Iterator[None]:
    """Also append log lines to ``path`` (a resumed run's ``train.log``), unless Hydra already writes there."""
    root = logging.getLogger()
    if any(getattr(handler, "baseFilename", None) == str(path.resolve()) for handler in root.handlers):
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


class SilentRunLog:
    """The run log of DDP ranks other than 0: every call does nothing."""

    seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def trainer_settings(cfg: DictConfig) -> TrainerSettings:
    """``cfg.trainer`` as TrainerSettings, every key and value checked (one ConfigError naming the key)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    unknown = unknown_trainer_keys(trainer_cfg)
    if unknown:
        raise ConfigError(unknown)
    settings = TrainerSettings(**{key: value for key, value in trainer_cfg.items() if key not in distributed.DISTRIBUTED_KEYS})
    if not distributed.is_main():  # rank 0 alone writes checkpoints and shows the progress bar
        settings.save_checkpoints, settings.progress_bar = False, False
    return settings


def make_trainer(
    cfg: DictConfig, components: Components, run_cfg: DictConfig, run_dir: Path, run_log: Any, settings: TrainerSettings | None = None
) -> Trainer:
    config = OmegaConf.to_container(run_cfg, resolve=True)
    return Trainer(components, settings or trainer_settings(cfg), run_log, run_dir, config)


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """Train as configured, write everything into the run dir, return the best val mIoU.

    With ``resume=<checkpoint or run dir>`` the run continues where the checkpoint left off, with
    the config stored in it (``resume_config``), writing into the checkpoint's run dir. Nothing
    there changes until the checkpoint has loaded into the built objects.
    """
    with contextlib.ExitStack() as session:  # undone when the session ends: the log handler of a resumed run
        run_dir = Path(run_dir)
        checkpoint = None
        if cfg.get("resume"):
            path = checkpoint_path(cfg.resume)
            checkpoint = load_checkpoint(path, "resume")
            run_dir = path.parent
            cfg = resume_config(cfg, stored_config(checkpoint), job_overrides())
        settings = trainer_settings(cfg)  # every trainer key checked before any work
        components, run_cfg = build(cfg)
        # A CPU setting, made here rather than in build(): it changes the whole process's allocator.
        keep_freed_memory_for_cpu_training(components.device.type, bool(cfg.trainer.get("keep_freed_memory", True)))
        trainer = make_trainer(cfg, components, run_cfg, run_dir, SilentRunLog(), settings)
        if checkpoint is not None:
            trainer.load(checkpoint)  # a checkpoint that does not fit fails here, before anything is written
            if distributed.is_main():
                session.enter_context(logging_into(run_dir / "train.log"))
            state = stored_state(checkpoint)
            log.info("resuming from %s (epoch %d, batch %d, step %d); writing into %s", path, state["epoch"], state["batch"], state["step"], run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(run_cfg, resolve=True))
        palette = resolve_palette(cfg.dataset.get("palette"), components.val_loader.dataset, components.num_classes)
        run_log = RunLog(
            run_dir, components.class_names, palette, cfg.trainer.log_image_size,
            # On resume, TensorBoard drops events logged after the checkpoint: curves get no duplicate points.
            purge_step=stored_state(checkpoint)["step"] + 1 if checkpoint else None,
        ) if distributed.is_main() else SilentRunLog()  # one TensorBoard writer and metrics.json per run: rank 0's
        if checkpoint is None:
            run_log.text("config", "```\n" + OmegaConf.to_yaml(run_cfg, resolve=True) + "\n```")
            run_log.hparams(OmegaConf.to_container(run_cfg, resolve=True), job_overrides() or [])
        trainer.run_log = run_log
        from segtrain.sweep import in_multirun

        if in_multirun():  # parallel jobs' bars: say whose is whose
            from hydra.core.hydra_config import HydraConfig

            trainer.progress_label = f"job {HydraConfig.get().job.num} "
        log.info("run dir: %s; %d optimizer steps; learning rate %g, scheduler=%s", run_dir, components.total_steps,
                 cfg.optimizer.lr, describe(OmegaConf.to_container(cfg.scheduler, resolve=True), components.total_steps))
        if components.time_budget is not None:
            log.info(
                "trainer.max_time: training stops after %d steps or %.0f s, whichever comes first (validations count; the last is "
                "expected to fit); scheduler=%s follows the further along, so the learning rate depends on the machine's speed "
                "and the run is not reproducible step for step",
                components.total_steps, components.time_budget.seconds, cfg.scheduler.get("name"),
            )
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


def inference_config(cfg: DictConfig, stored: dict[str, Any], overrides: list[str] | None) -> DictConfig:
    """The config the checkpoint was trained with; from the command line ``cfg`` its ``MODE_KEYS``
    and, among ``overrides`` (the command line's ``key=value`` and ``group=option``), the
    ``INFERENCE_KEYS``. Another override that differs from the checkpoint's value is refused
    (model, dataset, loss) or listed in a warning and ignored (training-only keys), naming both values."""
    return config_from_checkpoint(
        cfg, stored, overrides, INFERENCE_KEYS, refuse=lambda key: key.split(".")[0] in INFERENCE_GROUPS,
        refusal=(
            f"mode={cfg.mode} uses the config the checkpoint was trained with; these overrides would change what it "
            "computes: {refused}. Remove them; of model, dataset and loss only "
            f"{', '.join(key for key in INFERENCE_KEYS if key.startswith('dataset.'))} may change"
        ),
    )


# What a resumed run may change: where the data is and how it is loaded, how training is logged and
# checkpointed, and its length where the learning-rate curve does not depend on it. Everything else
# (model, data, loss, optimizer, schedule, batch size, seed) is the checkpoint's: a resumed run is the
# run it was, or it is refused.
RESUME_KEYS = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "dataset.root", "dataset.num_workers", "dataset.val_batch_size",
    "trainer.log_every", "trainer.val_every", "trainer.progress_bar", "trainer.log_images", "trainer.log_image_size",
    "trainer.ckpt_every_steps", "trainer.max_bad_steps", "trainer.compile", "trainer.keep_freed_memory", "trainer.dist_timeout",
)


def resume_config(cfg: DictConfig, stored: dict[str, Any], overrides: list[str] | None) -> DictConfig:
    """The config a resumed run continues with: the checkpoint's, with the command line's
    ``MODE_KEYS`` and those of ``overrides`` among ``RESUME_KEYS`` (listed once in the log).
    Any other override that differs from the checkpoint is refused, naming both values: it
    would be written into the run's record while the run went on as before (an lr the restored
    optimizer overwrites, a schedule or epoch count the restored scheduler does not follow)."""
    fresh_start = f"start a new run from these weights: +model.init_from={checkpoint_path(cfg.resume)} with your settings"
    run_cfg = config_from_checkpoint(
        cfg, stored, overrides, RESUME_KEYS, refuse=lambda key: True,
        refusal=(
            "resume continues the run with the config stored in its checkpoint; these overrides would change it "
            "mid-run: {refused}. Remove them (on resume only " + ", ".join(RESUME_KEYS) + ", device_list may change), "
            f"or {fresh_start}"
        ),
    )
    length = [(key, OmegaConf.select(run_cfg, key), OmegaConf.select(OmegaConf.create(stored), key)) for key in ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time")]
    scheduler = run_cfg.scheduler
    if any(new != old for _, new, old in length) and not (scheduler.get("name") in ("none", "step") and not scheduler.get("warmup_steps")):
        changed = ", ".join(f"{key}={new} (the checkpoint: {old})" for key, new, old in length if new != old)
        raise ConfigError(
            f"resume: {changed}: scheduler={scheduler.get('name')} with warmup_steps={scheduler.get('warmup_steps')} lays its "
            "learning-rate curve over the run's length, which the restored scheduler keeps; a longer run is possible on resume "
            f"only with scheduler=none or step and no warm-up. Resume with the checkpoint's length, or {fresh_start}"
        )
    return run_cfg


def config_from_checkpoint(
    cfg: DictConfig, stored: dict[str, Any], overrides: list[str] | None, may_change: tuple[str, ...],
    refuse: Callable[[str], bool], refusal: str,
) -> DictConfig:
    """The checkpoint's ``stored`` config with the command line's ``MODE_KEYS`` and its ``overrides``
    under ``may_change`` applied. Another override whose value differs from the checkpoint's is
    refused (``refuse(key)``: a ConfigError, ``refusal`` with ``{refused}`` filled in) or listed in
    a warning and ignored."""
    run_cfg = OmegaConf.create(stored)
    keys = [split_override(override)[0] for override in overrides] if overrides is not None else differing_keys(cfg, stored)
    refused, ignored, changed = [], [], []
    for key in keys:
        if key.startswith("hydra") or under(key, MODE_KEYS):
            continue
        given, trained = OmegaConf.select(cfg, key), OmegaConf.select(run_cfg, key)
        if isinstance(given, DictConfig) and isinstance(trained, DictConfig):  # a group: compare the option chosen
            given, trained = given.get("name", given.get("_target_")), trained.get("name", trained.get("_target_"))
        given, trained = (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value for value in (given, trained))
        if given == trained:
            continue
        difference = f"{key}={given} (the checkpoint: {trained})"
        if under(key, may_change):
            changed.append(difference)
        else:
            (refused if refuse(key) else ignored).append(difference)
    if refused:
        raise ConfigError(refusal.format(refused=", ".join(refused)))
    if ignored:
        log.warning("mode=%s: training settings on the command line are ignored (the checkpoint's apply): %s", cfg.mode, ", ".join(ignored))
    if changed:
        log.info("mode=%s: settings that differ from the checkpoint's, applied from now on: %s", cfg.get("mode", "train"), ", ".join(changed))
    with open_dict(run_cfg):
        for key in [*MODE_KEYS, *(key for key in keys if under(key, may_change))]:
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
    checkpoint = load_checkpoint(path, "resume")
    run_cfg = inference_config(cfg, stored_config(checkpoint), job_overrides() if overrides is None else overrides)
    components, _ = build(run_cfg)
    load_weights(components.model, checkpoint, strict=True)
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
