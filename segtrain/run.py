"""Run a training job from a composed config: what ``train.py`` calls."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from segtrain.build import build
from segtrain.run_log import RunLog
from segtrain.trainer import TrainerSettings, fit

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """Train as configured, write everything into ``run_dir``, return the best val mIoU."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    components, run_cfg = build(cfg)
    config = OmegaConf.to_container(run_cfg, resolve=True)
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(config))
    settings = TrainerSettings(**OmegaConf.to_container(cfg.trainer, resolve=True))
    run_log = RunLog(run_dir)
    run_log.text("config", "```\n" + OmegaConf.to_yaml(config) + "\n```")
    log.info("run dir: %s; %d optimizer steps", run_dir, components.total_steps)
    try:
        with logging_redirect_tqdm():
            metrics = fit(
                components.model, components.loss_fn, components.optimizer, components.scheduler,
                components.train_loader, components.val_loader, components.device,
                components.num_classes, components.ignore_index, components.class_names,
                settings, run_log, run_dir, config,
            )
    finally:
        run_log.close()
    log.info(
        "done: best val mIoU %.4f (epoch %s), %.1f s, %.1f images/s",
        metrics["best_miou"], metrics["best_epoch"], metrics["wall_seconds"], metrics["images_per_second"],
    )
    return float(metrics["best_miou"])
