"""Runs that never lie (issue 16), mostly through the real ``train.py``: trainer keys checked before any
work, a stop request during validation, what resume may and may not change, where a resumed
session logs, a kill -9 loop that must end where an uninterrupted run ends, last.pt written
before a validation that fails, and validation sizes checked against the model before the first step."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import segtrain.run
from conftest import REPO, TINY, compose_config, run_train_py
from segtrain import trainer as trainer_module
from segtrain.build import build, check_input_sizes
from segtrain.checkpoint import load_checkpoint
from segtrain.errors import ConfigError
from segtrain.models.unet import UNet
from test_folder_dataset import write_pairs
from test_user_errors import error_line

QUICK = [*TINY, "trainer.max_epochs=1", "trainer.log_images=0"]


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of a run dir with its size and modification time (the lock file aside)."""
    return {
        str(path.relative_to(run_dir)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(run_dir.rglob("*")) if path.is_file() and path.name != ".segtrain.lock"
    }


@pytest.mark.parametrize("setting", [
    "trainer.val_every=0", "trainer.log_every=0", "trainer.accumulate=0", "trainer.ckpt_every_steps=0",
    "trainer.max_epochs=0", "trainer.max_steps=0",
])
def test_a_trainer_key_out_of_range_stops_before_any_work(setting, tmp_path):
    process = run_train_py([f"hydra.run.dir={tmp_path}", *QUICK, setting])
    key, value = setting.split("=")
    assert error_line(process).startswith(f"{key}={value}: must be a whole number >= 1")
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "last.pt").exists()


def test_sigterm_during_validation_stops_within_seconds_and_resume_redoes_it(tmp_path):
    """Validation made slow (sliding 8 px windows over 64 images): SIGTERM while it runs."""
    run_dir = tmp_path / "run"
    slow_validation = [*TINY, "trainer.max_epochs=2", "trainer.val_every=1", "trainer.log_images=0", "dataset.val_samples=64",
                       "trainer.val_mode=slide", "trainer.window=8", "trainer.stride=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *slow_validation],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, state = time.time() + 120, None
    while time.time() < deadline and process.poll() is None:  # last.pt of epoch 1, written before its validation
        if (run_dir / "last.pt").exists():
            state = load_checkpoint(run_dir / "last.pt")["state"]
            if state["pending_validation"] == 1:
                break
        time.sleep(0.05)
    assert state is not None and state["pending_validation"] == 1, "never saw epoch 1's validation start"
    time.sleep(0.5)  # well inside the validation
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert time.time() - sent < 10, "a stop during validation must not wait for the whole validation"
    stopped = load_checkpoint(run_dir / "last.pt")["state"]
    assert stopped["pending_validation"] == 1 and stopped["step"] == 6 and stopped["history"] == [], stopped
    resumed = run_train_py([*slow_validation, f"resume={run_dir}"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [entry["epoch"] for entry in metrics["history"]] == [1, 2] and metrics["finished"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run with the default cosine schedule, and one with scheduler=none."""
    root = tmp_path_factory.mktemp("finished")
    for name, extra in (("cosine", []), ("constant", ["scheduler=none"])):
        process = run_train_py([f"hydra.run.dir={root / name}", *QUICK, *extra])
        assert process.returncode == 0, process.stderr[-3000:]
    return root


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=0.5", "optimizer.lr=0.5 (the checkpoint: 0.002)"),
    ("scheduler=none", "scheduler=none (the checkpoint: cosine)"),
    ("dataset.num_classes=3", "dataset.num_classes=3 (the checkpoint: 4)"),
    ("trainer.max_epochs=2", "trainer.max_epochs=2 (the checkpoint: 1): scheduler=cosine with warmup_steps=10 lays its"),
])
def test_resume_refuses_what_it_would_not_apply_and_leaves_the_run_dir_alone(override, message, finished_run):
    run_dir = finished_run / "cosine"
    before = snapshot(run_dir)
    process = run_train_py([*QUICK, override, f"resume={run_dir}"])
    line = error_line(process)
    assert message in line, line
    assert f"+model.init_from={run_dir / 'last.pt'}" in line, "the way to train on with other settings"
    after = snapshot(run_dir)
    assert {name: value for name, value in after.items() if name != "train.log"} == {
        name: value for name, value in before.items() if name != "train.log"
    }, "a refused resume changes nothing but the log"


def test_resume_applies_a_longer_constant_schedule_and_logging_and_logs_into_the_run(finished_run, tmp_path):
    """Started from another folder without hydra.run.dir: the session logs into the run's train.log
    and no fresh outputs/<date>/<time>/ appears."""
    run_dir = finished_run / "constant"
    process = run_train_py([*QUICK, "scheduler=none", "trainer.max_epochs=2", "trainer.log_every=2", f"resume={run_dir}"], cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-3000:]
    assert not (tmp_path / "outputs").exists(), "the resumed session made a run dir of its own"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["steps"] == 12 and metrics["finished"]
    log = (run_dir / "train.log").read_text()
    assert "applied from now on: trainer.max_epochs=2 (the checkpoint: 1), trainer.log_every=2 (the checkpoint: 1)" in log
    assert "resuming from" in log


def checkpoint_time(path: Path) -> int | None:
    """When ``path`` was last replaced (an atomic save renames a new file onto it); None while absent."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.slow  # several starts of train.py
def test_kill_9_at_random_moments_then_resume_ends_as_an_uninterrupted_run(tmp_path):
    common = [*TINY, "model.width=4", "trainer.deterministic=true", "trainer.max_epochs=4", "trainer.ckpt_every_steps=1",
              "trainer.log_images=0", "dataset.train_samples=64"]
    straight = run_train_py([f"hydra.run.dir={tmp_path / 'straight'}", *common])
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir, rng, kills, steps_at_kill = tmp_path / "killed", random.Random(16), 0, []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(12):
        args = [f"hydra.run.dir={run_dir}", *common] if attempt == 0 else [*common, f"resume={run_dir}"]
        saved_before = checkpoint_time(run_dir / "last.pt")
        process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills < 5:
            # Past start-up (seconds, more on a loaded machine): once this session has saved last.pt, kill it
            # within the next 0.25 s (a step and its save take about 0.04 s): mid-step, mid-save or mid-validation.
            deadline = time.time() + 120
            while checkpoint_time(run_dir / "last.pt") == saved_before and time.time() < deadline and process.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.25))
            if process.poll() is None:
                process.kill()
                kills += 1
                process.wait(timeout=60)
                steps_at_kill.append(load_checkpoint(run_dir / "last.pt")["state"]["step"])
        process.wait(timeout=300)
        metrics = run_dir / "metrics.json"
        if process.returncode == 0 and metrics.exists() and json.loads(metrics.read_text())["finished"]:
            break
    else:
        pytest.fail("the killed run never finished")
    assert kills >= 4, "the loop must really kill the run several times"
    # A session may be killed in the validation it redoes, before its next step: steps never go back, and they advance.
    assert steps_at_kill == sorted(steps_at_kill) and len(set(steps_at_kill)) >= 3, (
        f"the killed sessions trained on from each other's last.pt (its step at each kill: {steps_at_kill})"
    )
    assert not list(run_dir.glob(".*.tmp")), "temporaries of killed saves are cleaned at the next save"
    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight", run_dir))
    assert got["history"] == expected["history"], "every validation (loss, mIoU, per-class IoU) as in the uninterrupted run"
    assert got["steps"] == expected["steps"] and got["best_miou"] == expected["best_miou"]
    weights = load_checkpoint(run_dir / "last.pt")["model"]
    for key, value in load_checkpoint(tmp_path / "straight" / "last.pt")["model"].items():
        assert torch.equal(weights[key], value), f"{key} differs after the kills"


def test_validation_images_too_small_for_the_unet_stop_before_the_first_step(tmp_path):
    """Issue 16: the audit's validation sizes against what the model takes, before any training."""
    import numpy as np
    from PIL import Image

    for split, count in (("train", 4), ("val", 2)):
        for folder in ("images", "masks"):
            (tmp_path / "data" / split / folder).mkdir(parents=True)
        for index in range(count):
            side = 6 if split == "val" and index == 1 else 12
            Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(tmp_path / "data" / split / "images" / f"{index}.png")
            Image.fromarray((np.arange(side * side).reshape(side, side) % 2).astype(np.uint8)).save(
                tmp_path / "data" / split / "masks" / f"{index}.png")
    folder = ["dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.train_images=train/images",
              "dataset.train_masks=train/masks", "dataset.val_images=val/images", "dataset.val_masks=val/masks",
              "dataset.num_classes=2", "dataset.num_workers=0", "dataset.batch_size=2", "dataset.size=8",
              "dataset.size_mode=crop", "model.width=4", "model.depth=3", *QUICK[:1], "trainer.max_epochs=1",
              "trainer.progress_bar=false"]
    line = error_line(run_train_py([f"hydra.run.dir={tmp_path / 'run'}", *folder]))
    assert line.startswith("validation input 6x6 (1.png) is smaller than 2^model.depth=8 pixels a side"), line
    assert "use model.depth=2 or less" in line
    assert not (tmp_path / "run" / "last.pt").exists()
    fits = run_train_py([f"hydra.run.dir={tmp_path / 'run2'}", *folder, "model.depth=2"])
    assert fits.returncode == 0, fits.stderr[-3000:]
    assert "validation inputs such as 6x6 are not multiples of 2^model.depth=4: the UNet interpolates" in (tmp_path / "run2" / "train.log").read_text()


def test_a_failing_validation_leaves_last_pt_with_the_trained_epoch_and_resume_redoes_it(tmp_path, monkeypatch):
    """last.pt is written before validation: a validation that raises (not a signal) loses no training."""
    overrides = [*TINY, "model.width=4", "trainer.deterministic=true", "trainer.log_images=0"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    segtrain.run.train(compose_config(overrides), straight)

    def evaluate_raises(*args, **kwargs):
        raise RuntimeError("validation broke")

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "evaluate", evaluate_raises)
        with pytest.raises(RuntimeError, match="validation broke"):
            segtrain.run.train(compose_config(overrides), broken)
    state = load_checkpoint(broken / "last.pt")["state"]
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 6), "epoch 1's six steps are in last.pt"
    assert state["pending_validation"] == 1 and state["history"] == [] and state["best_miou"] is None
    assert not (broken / "best.pt").exists()

    segtrain.run.train(compose_config([*overrides, f"resume={broken}"]), tmp_path / "unused")
    expected, got = (json.loads((run / "metrics.json").read_text()) for run in (straight, broken))
    assert [entry["epoch"] for entry in got["history"]] == [1, 2], "epoch 1 validated once, on resume"
    assert [entry["mIoU"] for entry in got["history"]] == [entry["mIoU"] for entry in expected["history"]]
    weights = load_checkpoint(broken / "last.pt")["model"]
    for key, value in load_checkpoint(straight / "last.pt")["model"].items():
        assert torch.equal(weights[key], value), f"{key} differs from the uninterrupted run"


# --- validation sizes against the model, before the first step --------------------------------


def whole(**trainer: object):
    return OmegaConf.create({"val_mode": "whole", "window": None, **trainer})


def test_validation_inputs_below_two_to_the_depth_are_refused_naming_file_and_fix():

    model = UNet(1, 2, depth=3)
    assert model.size_multiple == 8
    with pytest.raises(ConfigError) as error:
        check_input_sizes(model, {(16, 16): "big.png", (6, 9): "small.png", (7, 40): "thin.png"}, whole())
    assert str(error.value) == (
        "validation input 6x9 (small.png) is smaller than 2^model.depth=8 pixels a side, which model.depth=3 needs to pool "
        "3 times: use model.depth=2 or less, larger images, or trainer.val_mode=slide with trainer.window=8 or more "
        "(smaller images are padded to it)"
    )
    check_input_sizes(model, {(6, 9): "small.png"}, whole(val_mode="slide", window=8))  # padded up to the window: fine
    with pytest.raises(ConfigError, match=r"validation input 4x4 \(trainer.window\) is smaller than 2\^model.depth=8"):
        check_input_sizes(model, {(64, 64): "big.png"}, whole(val_mode="slide", window=4))
    with pytest.raises(ConfigError, match=r"1x30 \(line.png\).*needs to pool 3 times: use larger images"):
        check_input_sizes(model, {(1, 30): "line.png"}, whole())  # no depth fits a 1-pixel side


def test_validation_sizes_that_are_no_multiple_are_said_once(caplog):

    model = UNet(1, 2, depth=3)
    with caplog.at_level("INFO", logger="segtrain.build"):
        check_input_sizes(model, {(16, 24): "a.png", (64, 64): "b.png"}, whole())
    assert not caplog.records, "multiples of 8: nothing to say"
    with caplog.at_level("INFO", logger="segtrain.build"):
        check_input_sizes(model, {(12, 20): "a.png", (13, 13): "b.png", (16, 16): "c.png"}, whole())
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "are not multiples of 2^model.depth=8: the UNet interpolates its decoder features" in lines[0]
    assert "(no padding)" in lines[0]


def test_validation_sizes_come_from_the_audit_the_resize_or_the_first_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    write_pairs(tmp_path / "data", count=5, size=(12, 20))
    folder = ["dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.train_images=images", "dataset.train_masks=masks",
              "dataset.num_classes=2", "dataset.mask_values=[0,255]", "dataset.num_workers=0", "dataset.size=16",
              "device_list=[]", "model.width=4", "model.depth=3"]
    calls = []
    monkeypatch.setattr("segtrain.build.check_input_sizes", lambda model, sizes, trainer: calls.append(sizes))
    build(compose_config([*folder, "dataset.size_mode=crop"]))  # whole validation images at full size: the audit's
    build(compose_config([*folder, "dataset.size_mode=resize"]))  # resized to dataset.size
    build(compose_config([*TINY, "dataset.size=24"]))  # generated: the first validation sample
    assert len(calls[0]) == 1 and list(calls[0]) == [(12, 20)] and calls[0][(12, 20)].endswith(".png")
    assert calls[1] == {(16, 16): "dataset.size (dataset.size_mode=resize)"}
    assert calls[2] == {(24, 24): "the first validation sample"}


def test_smp_architectures_that_need_divisible_sizes_are_refused_before_the_first_step():
    smp = pytest.importorskip("segmentation_models_pytorch", reason="the smp extra is not installed")

    fpn = smp.FPN(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=2)
    with pytest.raises(ConfigError, match=r"validation input 40x40 \(a.png\): model.arch=FPN needs sides divisible by 32"):
        check_input_sizes(fpn, {(64, 64): "b.png", (40, 40): "a.png"}, whole())
    check_input_sizes(fpn, {(40, 40): "a.png"}, whole(val_mode="slide", window=64))  # padded to 64x64 windows
    unet = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=2)
    check_input_sizes(unet, {(40, 40): "a.png"}, whole())  # smp's Unet takes any size

