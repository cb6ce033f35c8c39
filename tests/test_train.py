"""End to end: train.py as a subprocess, read back what users read."""
import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONFIGS, TINY, TINY_3D, compose_config
from segtrain.build import build_model
from segtrain.checkpoint import load_checkpoint


def read_scalars(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_train_py_leaves_metrics_checkpoints_and_event_files(tmp_path, train_py):
    train_py(tmp_path, *TINY, "trainer.max_epochs=3", "optimizer.lr=0.01")
    assert (tmp_path / ".hydra" / "config.yaml").exists()

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("best_miou", "best_epoch", "final", "epochs", "steps", "wall_seconds", "images_per_second"):
        assert metrics[key] is not None, key
    assert metrics["epochs"] == 3 and metrics["steps"] == 3 * (48 // 8)
    assert set(metrics["final"]["IoU"]) == {"background", "ellipse", "rectangle", "triangle"}
    history_mious = [entry["mIoU"] for entry in metrics["history"]]
    assert metrics["best_miou"] == max(history_mious)
    assert metrics["best_epoch"] == metrics["history"][history_mious.index(max(history_mious))]["epoch"]
    assert metrics["final"]["mIoU"] == history_mious[-1]

    scalars = read_scalars(tmp_path)
    expected = {"train/loss", "train/lr", "val/loss", "val/mIoU", "val/acc", "val/dice", "val/IoU/background"}
    assert expected <= set(scalars), set(scalars)
    losses = [value for _, value in scalars["train/loss"]]
    assert len(losses) == metrics["steps"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"training loss did not go down: {losses}"
    assert [step for step, _ in scalars["val/mIoU"]] == [6, 12, 18], "validation is logged at the global step"
    assert math.isclose(scalars["val/mIoU"][-1][1], metrics["final"]["mIoU"], rel_tol=1e-6)

    for name in ("last.pt", "best.pt"):
        checkpoint = load_checkpoint(tmp_path / name)
        assert checkpoint["config"]["model"]["width"] == 8
        model = build_model(checkpoint["config"]["model"], out_channels=4)
        model.load_state_dict(checkpoint["model"])  # the weights fit the architecture named in the checkpoint
    assert load_checkpoint(tmp_path / "last.pt")["state"]["step"] == metrics["steps"]
    assert load_checkpoint(tmp_path / "best.pt")["state"]["best_epoch"] == metrics["best_epoch"]


def test_3d_run_trains_and_validates_on_the_cpu(tmp_path, train_py):
    train_py(tmp_path, *TINY_3D)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0 <= metrics["final"]["mIoU"] <= 1
    assert set(metrics["final"]["IoU"]) == {"background", "ellipsoid", "box", "octahedron"}
    assert "val/IoU/background" in read_scalars(tmp_path)


def test_task_function_returns_best_miou(tmp_path):
    import segtrain.run

    cfg = compose_config([*TINY, "trainer.max_epochs=1"])
    best = segtrain.run.train(cfg, tmp_path)
    assert best == json.loads((tmp_path / "metrics.json").read_text())["best_miou"]


def test_max_steps_and_val_every(tmp_path, train_py):
    train_py(tmp_path, *TINY, "trainer.max_steps=9", "trainer.max_epochs=100", "trainer.val_every=5")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 9 and metrics["epochs"] == 2
    assert [entry["step"] for entry in metrics["history"]] == [9], "the last epoch is always validated"


def test_sweep_writes_one_run_dir_per_job(tmp_path):
    from conftest import run_train_py

    process = run_train_py(["-m", f"hydra.sweep.dir={tmp_path}", *TINY, "trainer.max_epochs=1", "optimizer.lr=0.01,0.001"])
    assert process.returncode == 0, process.stderr[-3000:]
    for job in ("0", "1"):
        metrics = json.loads((tmp_path / job / "metrics.json").read_text())
        assert metrics["epochs"] == 1
    lrs = {json.loads((tmp_path / job / "metrics.json").read_text())["history"][0]["loss"] for job in ("0", "1")}
    assert len(lrs) == 2, "the two jobs trained with different learning rates"


def test_default_config_composes_with_contract_keys():
    cfg = compose_config([])
    for key in ("device_list", "seed", "trainer.max_epochs", "trainer.max_steps", "trainer.val_every",
                "dataset.batch_size", "dataset.num_workers", "dataset.num_classes", "dataset.ignore_index",
                "dataset.size", "optimizer.lr"):
        assert key.split(".")[-1] in (cfg if "." not in key else cfg[key.split(".")[0]]), key
    # The builder gives the model its output channels (from dataset.num_classes and the loss): the
    # model config holds no class count of its own.
    assert "num_classes" not in cfg.model and cfg.model.in_channels == cfg.dataset.in_channels
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        hydra_cfg = compose(config_name="train", return_hydra_config=True).hydra
    assert hydra_cfg.job.chdir is False
    dirs = OmegaConf.to_container(hydra_cfg, resolve=False)  # the templates, not today's date
    assert dirs["run"]["dir"] == "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S-%f}"  # microseconds: two launches in one second get two dirs
    assert dirs["sweep"]["dir"] == "outputs/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S-%f}"


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("scheduler", ["none", "poly", "cosine", "step"])
def test_optimizer_and_scheduler_groups_build(optimizer, scheduler):
    from segtrain.build import build

    cfg = compose_config([*TINY, f"optimizer={optimizer}", f"scheduler={scheduler}", "scheduler.warmup_steps=2"])
    components, _ = build(cfg)
    assert type(components.optimizer).__name__.lower() == optimizer
    lrs = []
    for _ in range(components.total_steps):
        components.optimizer.step()
        components.scheduler.step()
        lrs.append(components.optimizer.param_groups[0]["lr"])
    assert all(lr >= 0 for lr in lrs)
    if scheduler in ("poly", "cosine"):
        assert lrs[-1] < 0.05 * cfg.optimizer.lr
