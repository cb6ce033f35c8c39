"""trainer.val_every=auto: validate every epoch unless validation would take more than about a fifth of the run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import TINY
from segtrain.audit import AuditReport
from segtrain.build import validation_cadence
from segtrain.errors import ConfigError
from segtrain.trainer import TrainerSettings


def cadence(train: int, val_sizes: dict, size, trainer: dict | None = None, report: AuditReport | None = None, val: int = 6, mode: str = "crop") -> int:
    return validation_cadence({"val_every": "auto", **(trainer or {})}, {"size": size, "size_mode": mode}, [0] * train, [0] * val, val_sizes, report)


def test_auto_weighs_validation_pixels_against_an_epochs_training():
    # ISBI: 6 whole 512x512 slices against 24 crops of 128 (x3 for backward): 1.33 epochs -> every 6th.
    assert cadence(24, {(512, 512): "a.png"}, 128) == 6
    # A folder set resized to its training size: 51 against 123 -> every epoch.
    assert cadence(123, {(176, 240): "dataset.size"}, [176, 240], val=51, mode="resize") == 1
    # Sliding windows of 128 with half-window strides see each pixel about 4 times.
    assert cadence(24, {(512, 512): "a.png"}, 128, {"val_mode": "slide", "window": 128, "stride": None}) == 22
    # The audit's pixel counts (images of several sizes) are used when validation runs on whole images.
    report = AuditReport(["a", "b"], {}, {"val": np.array([6 * 512 * 512 - 100, 0])}, {"val": 100})
    assert cadence(24, {(512, 512): "a.png", (256, 256): "b.png"}, 128, report=report) == 6
    # A number is kept as it is.
    assert validation_cadence({"val_every": 3}, {}, [], [], {}, None) == 3


def test_val_every_accepts_auto_and_whole_numbers_only():
    assert TrainerSettings(val_every="auto").val_every == "auto"
    with pytest.raises(ConfigError, match="trainer.val_every=0: must be a whole number >= 1 or auto"):
        TrainerSettings(val_every=0)


def test_a_run_with_little_training_per_epoch_validates_every_kth_epoch_and_after_the_last(tmp_path, train_py):
    # 8 training samples against 16 validation samples of the same size: 16 / (3 x 8) = 0.67 epochs -> every 3rd.
    process = train_py(tmp_path, *TINY, "dataset.train_samples=8", "dataset.val_samples=16", "trainer.max_epochs=4")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [entry["epoch"] for entry in metrics["history"]] == [3, 4]
    assert yaml.safe_load((tmp_path / "config_resolved.yaml").read_text())["trainer"]["val_every"] == 3
    assert "trainer.val_every=auto: validating every 3 epochs" in process.stdout + process.stderr + (tmp_path / "train.log").read_text()
