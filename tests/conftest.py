"""Shared fixtures: the real config composed with Hydra's compose API, shrunk to CPU-tiny sizes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# CPU, tiny images, a tiny UNet, two short epochs, every step logged.
TINY = [
    "device_list=[]",
    "dataset.size=32",
    "dataset.train_samples=48",
    "dataset.val_samples=8",
    "dataset.batch_size=8",
    "model.width=8",
    "model.depth=2",
    "trainer.max_epochs=2",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
]
TINY_3D = [
    "dataset=shapes3d",
    "model=unet3d",
    "device_list=[]",
    "dataset.size=16",
    "dataset.train_samples=8",
    "dataset.val_samples=4",
    "dataset.batch_size=2",
    "model.width=4",
    "model.depth=2",
    "trainer.max_epochs=1",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
]


def compose_config(overrides: list[str]) -> DictConfig:
    """The real ``configs/train.yaml`` with overrides, as ``python train.py`` would see it."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture
def tiny_config() -> DictConfig:
    return compose_config(TINY)


def run_train_py(args: list[str], cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` as a user would; returns the finished process (not checked)."""
    # One thread per tiny run: torch's default thread pool costs more than it gives at these
    # sizes, and far more when several processes share the cores.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture
def train_py():
    """Call as ``train_py(run_dir, *overrides)``: runs train.py with its run dir at ``run_dir``; fails on error."""

    def run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
        process = run_train_py([f"hydra.run.dir={run_dir}", *overrides])
        assert process.returncode == 0, f"train.py failed:\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
        return process

    return run
