"""mode=export: model.onnx, model.pt2 and export.json, read back as a deployment would."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import segtrain.export
import segtrain.run
from conftest import TINY, TINY_3D, compose_config, run_train_py
from segtrain.errors import ConfigError
from segtrain.errors import ExportError
from segtrain.registry import MODELS
from test_folder_dataset import write_pairs

onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")

MEAN, STD = [0.4, 0.3, 0.5], [0.2, 0.25, 0.3]


@pytest.fixture(autouse=True)
def audit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def read_export(run_dir):
    description = json.loads((run_dir / "export" / "export.json").read_text())
    assert description["check"]["passed"], description["check"]
    for row in description["check"]["rows"]:
        assert row["max_abs_diff"] <= 1e-4 * max(1.0, row["max_abs_logit"]) and row["argmax_agreement"] >= 0.999, row
    assert (run_dir / "export" / "model.onnx").stat().st_size > 0 and (run_dir / "export" / "model.pt2").stat().st_size > 0
    return description


def test_exported_onnx_with_export_json_preprocessing_equals_predict(tmp_path):
    """The deployment's view: PNG -> export.json's scaling and normalisation -> onnxruntime -> argmax,
    against mode=predict's mask of the same PNG."""
    write_pairs(tmp_path / "data", rgb=True, count=8, size=(40, 48))
    common = [
        "dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.train_images=images", "dataset.train_masks=masks",
        "dataset.num_classes=2", "dataset.mask_values=[0,255]", "dataset.size=32", "dataset.batch_size=4",
        f"dataset.mean={MEAN}", f"dataset.std={STD}", "dataset.class_names=[bg,square]",
        *[arg for arg in TINY if not arg.startswith("dataset.")], "trainer.max_epochs=2", "trainer.log_images=0",
    ]
    env_dirs = {"run": tmp_path / "run", "log": tmp_path / "export_log", "predict": tmp_path / "predict"}
    assert run_train_py([f"hydra.run.dir={env_dirs['run']}", *common]).returncode == 0
    exported = run_train_py([f"hydra.run.dir={env_dirs['log']}", "mode=export", f"resume={env_dirs['run']}"])
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    assert "onnxruntime (model.onnx)" in exported.stdout and "argmax agreement" in exported.stdout
    description = read_export(env_dirs["run"])
    assert description["class_names"] == ["bg", "square"] and description["num_classes"] == 2
    assert description["input"]["mean"] == MEAN and description["input"]["std"] == STD
    assert description["input"]["layout"] == "N, C, H, W" and description["input"]["channels"] == 3
    assert description["input"]["shape"] == ["N", "3", "H", "W"] and description["input"]["fixed_axes"] == []
    assert description["output"]["channels"] == 2 and "argmax" in description["output"]["prediction"]
    assert description["checkpoint"]["path"].endswith("best.pt") and description["checkpoint"]["best_miou"] is not None
    assert len(description["palette"]) == 2 and description["versions"]["onnxruntime"] == onnxruntime.__version__
    sizes = {tuple(row["input"][2:]) for row in description["check"]["rows"]}
    assert sizes == {(32, 32), (48, 48)}, "the training size and one other"

    images = tmp_path / "images"
    images.mkdir()
    png = tmp_path / "data" / "images" / "s0.png"
    Image.open(png).save(images / "s0.png")
    predicted = run_train_py([f"hydra.run.dir={env_dirs['predict']}", *common, "mode=predict",
                              f"resume={env_dirs['run'] / 'best.pt'}", f"predict.input={images}"])
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    predict_mask = np.array(Image.open(env_dirs["run"] / "predictions" / "s0.png"))

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0  # export.json: uint8 / 255
    inputs = (pixels - np.array(description["input"]["mean"])) / np.array(description["input"]["std"])
    batch = inputs.transpose(2, 0, 1)[None].astype(np.float32)  # N, C, H, W at the image's own size (40 x 48)
    session = onnxruntime.InferenceSession(str(env_dirs["run"] / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0]
    deployed_mask = logits.argmax(1)[0]
    assert deployed_mask.shape == predict_mask.shape == (40, 48)
    assert (deployed_mask == predict_mask).mean() >= 0.999


@pytest.mark.parametrize(
    "case, overrides",
    [
        ("unet3d", [*TINY_3D]),
        ("sigmoid (1 channel)", [*TINY, "loss=bce", "dataset.num_classes=2", "dataset.class_names=[bg,fg]"]),
        ("sliding window", [*TINY, "trainer.val_mode=slide", "trainer.window=24", "trainer.stride=12"]),
    ],
)
def test_export_variants(case, overrides, tmp_path):
    segtrain.run.train(compose_config([*overrides, "trainer.max_epochs=1", "trainer.log_images=0"]), tmp_path)
    agreement = segtrain.run.main(compose_config([*overrides, "mode=export", f"resume={tmp_path}"]), tmp_path / "log")
    assert agreement >= 0.999
    description = read_export(tmp_path)
    if case == "unet3d":
        assert description["input"]["layout"] == "N, C, D, H, W" and description["input"]["shape"] == ["N", "1", "D", "H", "W"]
        assert {tuple(row["input"][2:]) for row in description["check"]["rows"]} == {(16, 16, 16), (24, 24, 24)}
    if case.startswith("sigmoid"):
        assert description["output"]["channels"] == 1 and "sigmoid" in description["output"]["kind"]
        assert "logit > 0" in description["output"]["prediction"]
        session = onnxruntime.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert session.get_outputs()[0].shape[1] == 1
    if case == "sliding window":
        assert description["inference"]["val_mode"] == "slide"
        assert description["inference"]["window"] == 24 and description["inference"]["stride"] == 12


@pytest.mark.slow  # each torchvision model takes 10-30 s to export on the CPU
@pytest.mark.parametrize("model", ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_torchvision_models_export(model, tmp_path):
    tiny = [arg for arg in TINY if not arg.startswith("model.")]  # the UNet's width and depth
    overrides = [*tiny, f"model={model}", "trainer.max_steps=1", "trainer.log_images=0", "dataset.val_samples=2"]
    segtrain.run.train(compose_config(overrides), tmp_path)
    segtrain.run.main(compose_config([*overrides, "mode=export", f"resume={tmp_path / 'last.pt'}"]), tmp_path / "log")
    description = read_export(tmp_path)
    assert description["input"]["fixed_axes"] == [], "batch and spatial sizes stay dynamic"


class Bessel(nn.Module):
    """A model with an op ONNX has no translation for (torch.special.bessel_j0)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 4, **ignored) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, images):
        logits = self.conv(images)
        return logits + torch.special.bessel_j0(logits)


if "test_bessel" not in MODELS:
    MODELS.register("test_bessel")(Bessel)


def test_an_op_onnx_lacks_is_named(tmp_path):
    overrides = [*TINY, "model.name=test_bessel", "trainer.max_epochs=1", "trainer.log_images=0"]
    segtrain.run.train(compose_config(overrides), tmp_path)
    with pytest.raises(ExportError, match=r"model=test_bessel: ONNX has no translation for prims.bessel_j0; .*custom_translation_table"):
        segtrain.run.main(compose_config([*overrides, "mode=export", f"resume={tmp_path}"]), tmp_path / "log")
    assert (tmp_path / "export" / "model.pt2").exists() and not (tmp_path / "export" / "export.json").exists()


def test_missing_extra_and_missing_checkpoint_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="mode=export needs a checkpoint: add resume="):
        segtrain.run.main(compose_config([*TINY, "mode=export"]), tmp_path)
    with pytest.raises(ConfigError, match=r"resume=.*: no checkpoint there"):
        segtrain.run.main(compose_config([*TINY, "mode=export", f"resume={tmp_path}"]), tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(segtrain.export.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real_find_spec(name))
    with pytest.raises(ConfigError, match=r"mode=export needs onnxruntime: install the export extra, pip install -e '.\[export\]'"):
        segtrain.run.main(compose_config([*TINY, "mode=export", f"resume={tmp_path}"]), tmp_path)
