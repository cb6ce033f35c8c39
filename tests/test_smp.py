"""model=smp: segmentation_models_pytorch architectures with timm/torchvision encoders, local weights only."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, compose_config, run_train_py
from segtrain.build import build_model
from segtrain.errors import ConfigError

smp = pytest.importorskip("segmentation_models_pytorch", reason="the smp extra is not installed: pip install -e '.[smp]'")
SMALL = [arg for arg in TINY if not arg.startswith("model.")] + ["model=smp"]


def model_config(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config([*SMALL, *overrides]).model, resolve=True)


def test_train_py_trains_an_smp_unet_with_a_random_encoder(tmp_path):
    process = run_train_py([f"hydra.run.dir={tmp_path}", *SMALL, "trainer.max_epochs=1", "trainer.log_images=0"])
    assert process.returncode == 0, process.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["finished"] and metrics["steps"] == 48 // 8
    assert "model: smp" in (tmp_path / "train.log").read_text()


def test_encoder_weights_come_from_a_local_file(tmp_path):
    source = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=4)
    torch.save(source.encoder.state_dict(), tmp_path / "resnet18_encoder.pth")
    model = build_model(model_config(f"model.encoder_weights={tmp_path / 'resnet18_encoder.pth'}"), 4)
    for name, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name
    fresh = build_model(model_config(), 4)
    assert not torch.equal(fresh.encoder.conv1.weight, source.encoder.conv1.weight), "null: random init"


def test_other_architectures_encoders_and_channels():
    model = build_model(model_config("model.arch=FPN", "model.encoder=mobilenet_v2", "dataset.in_channels=1"), 3)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3, 64, 64)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.encoder_weights=/nowhere/encoder.pth", "model.encoder_weights=/nowhere/encoder.pth: no such file; weights are never downloaded"),
        ("model.arch=Unett", "model.arch=Unett: not a segmentation_models_pytorch architecture; known: .*Unet"),
        ("model.encoder=resnet1800", "model.encoder=resnet1800: unknown to segmentation_models_pytorch"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_model(model_config(override), 4)
