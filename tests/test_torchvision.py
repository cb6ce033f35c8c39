"""torchvision models (one training step each on the CPU) and datasets (on fake copies of their layout)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_config
from segtrain.build import build, build_datasets, build_model, build_run_loss
from segtrain.batches import MaskCheck
from segtrain.errors import ConfigError
from segtrain.losses import AuxiliaryHeadLoss, loss_terms

TORCHVISION_MODELS = ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]


@pytest.fixture(autouse=True)
def audit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def model_config(name: str, *overrides: str) -> dict:
    return OmegaConf.to_container(compose_config([f"model={name}", *overrides]).model, resolve=True)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_each_model_trains_a_step_with_its_aux_loss(name):
    torch.manual_seed(0)
    model = build_model(model_config(name), out_channels=5)
    run_loss, _ = build_run_loss({"name": "ce"}, model_config(name), None, 5, None)
    # The aux head's weight lives on the loss side, not in the model.
    assert not hasattr(model, "aux_weight")
    assert isinstance(run_loss, AuxiliaryHeadLoss) != name.startswith("lraspp")
    assert name.startswith("lraspp") or run_loss.weight == 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    outputs = model.train()(images)
    loss, terms = loss_terms(run_loss, outputs, masks)
    if name.startswith("lraspp"):
        assert outputs.shape == (2, 5, 64, 64) and "aux" not in terms
    else:
        assert outputs["out"].shape == outputs["aux"].shape == (2, 5, 64, 64)
        expected = loss_fn(outputs["out"], masks) + 0.5 * loss_fn(outputs["aux"], masks)
        assert torch.allclose(loss, expected) and torch.allclose(terms["aux"], 0.5 * loss_fn(outputs["aux"], masks))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.eval()(images).shape == (2, 5, 64, 64), "eval mode returns the logits only"


def test_in_channels_adapts_the_first_convolution_and_aux_can_be_off():
    model = build_model(model_config("deeplabv3_mobilenet_v3_large", "dataset.in_channels=1", "model.aux_loss=false"), 2)
    assert model.train()(torch.randn(2, 1, 64, 64)).shape == (2, 2, 64, 64), "no aux head: plain logits in train mode"
    model = build_model(model_config("fcn_resnet50", "dataset.in_channels=4"), 3)
    assert model.model.backbone.conv1.in_channels == 4
    with pytest.raises(ConfigError, match="model.in_channels=0"):
        build_model(model_config("lraspp_mobilenet_v3_large", "dataset.in_channels=0"), 2)


def test_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as error:
        build_model(model_config("deeplabv3_resnet50", "model.weights=COCO_WITH_VOC_LABELS_V1"), 21)
    message = str(error.value)
    assert "model.weights=COCO_WITH_VOC_LABELS_V1: weights are never downloaded" in message
    assert str(tmp_path / "hub" / "checkpoints" / "deeplabv3_resnet50_coco-cd0a2569.pth") in message
    with pytest.raises(ConfigError, match="model.weights_backbone=IMAGENET9K: not a torchvision weights name for resnet50"):
        build_model(model_config("fcn_resnet50", "model.weights_backbone=IMAGENET9K"), 21)


def test_weights_from_hub_cache_and_local_file(tmp_path, monkeypatch):
    """A "cached" backbone file (written here) is loaded by name; a model file loads all but the class layers."""
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    backbone = torchvision.models.mobilenet_v3_large(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(backbone.state_dict(), tmp_path / "hub" / "checkpoints" / "mobilenet_v3_large-8738ca79.pth")
    model = build_model(model_config("lraspp_mobilenet_v3_large", "model.weights_backbone=IMAGENET1K_V1"), 3)
    assert torch.equal(model.model.backbone["1"].block[0][0].weight, backbone.features[1].block[0][0].weight)

    source = build_model(model_config("deeplabv3_mobilenet_v3_large"), 21)
    torch.save(source.model.state_dict(), tmp_path / "local.pth")
    model = build_model(model_config("deeplabv3_mobilenet_v3_large", f"model.weights={tmp_path / 'local.pth'}"), 4)
    assert torch.equal(model.model.classifier[0].convs[0][0].weight, source.model.classifier[0].convs[0][0].weight)
    assert model.model.classifier[4].out_channels == 4, "the class layer keeps its shape (and random init)"


def test_model_trains_through_train_py_config(tmp_path):
    """build() with a torchvision model and the shapes data: the aux term is in the loss the trainer uses."""
    cfg = compose_config(["model=lraspp_mobilenet_v3_large", "device_list=[]", "dataset.size=64", "dataset.train_samples=4",
                          "dataset.val_samples=2", "dataset.batch_size=2"])
    components, _ = build(cfg)
    images, masks = next(iter(components.train_loader))
    assert components.model.train()(images).shape == (2, 4, 64, 64)


# --- datasets: fake copies of the on-disk layouts, written here --------------------------------


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def fake_voc(root):
    base = root / "VOCdevkit" / "VOC2012"
    names = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]}
    for split, stems in names.items():
        (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for stem in stems:
            save(base / "JPEGImages" / f"{stem}.jpg", np.full((30, 40, 3), 120, np.uint8))
            mask = Image.fromarray(np.array([[0, 15], [255, 20]], np.uint8).repeat(15, 0).repeat(20, 1), mode="P")
            mask.putpalette([0, 0, 0, 128, 0, 0] * 128)
            (base / "SegmentationClass").mkdir(exist_ok=True)
            mask.save(base / "SegmentationClass" / f"{stem}.png")


def fake_pets(root):
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    (base / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\nbeagle_2 2 2 1\n")
    (base / "annotations" / "test.txt").write_text("Abyssinian_3 1 1 1\n")
    for stem in ("Abyssinian_1", "beagle_2", "Abyssinian_3"):
        save(base / "images" / f"{stem}.jpg", np.full((30, 40, 3), 90, np.uint8))
        save(base / "annotations" / "trimaps" / f"{stem}.png", np.array([[1, 2], [3, 2]], np.uint8).repeat(15, 0).repeat(20, 1))


def fake_cityscapes(root):
    for split, cities in (("train", ["aachen"]), ("val", ["lindau"])):
        for city in cities:
            stem = f"{city}_000000_000019"
            save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", np.full((32, 64, 3), 50, np.uint8))
            save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                 np.array([[7, 26], [0, 33]], np.uint8).repeat(16, 0).repeat(32, 1))


@pytest.mark.parametrize(
    "name, fake, expected_classes",
    [("voc", fake_voc, {0, 15, 20, 255}), ("pets", fake_pets, {0, 1, 2}), ("cityscapes", fake_cityscapes, {0, 13, 18, 255})],
)
def test_dataset_configs_read_their_layout(tmp_path, name, fake, expected_classes):
    fake(tmp_path)
    cfg = compose_config([f"dataset={name}", f"dataset.root={tmp_path}", "dataset.size=16", "dataset.num_workers=0", "device_list=[]"])
    train_set, val_set = build_datasets(OmegaConf.to_container(cfg.dataset, resolve=True))
    assert len(train_set) >= 1 and len(val_set) == 1
    image, mask = val_set[0]
    assert image.shape[0] == 3 and image.shape[1:] == mask.shape and mask.shape[0] >= 30, "validation: whole images"
    assert set(mask.unique().tolist()) == expected_classes
    crop_image, crop_mask = train_set[0]
    assert crop_image.shape == (3, 16, 16) and crop_mask.shape == (16, 16)
    components, _ = build(compose_config([f"dataset={name}", f"dataset.root={tmp_path}", "dataset.size=16", "dataset.num_workers=0",
                                          "dataset.batch_size=1", "device_list=[]", "model.width=4", "model.depth=2"]))
    assert components.num_classes == cfg.dataset.num_classes  # the audit passed on the fake copy
    for loader in (components.train_loader, components.val_loader):  # batches pass the loader's mask check
        assert isinstance(loader.collate_fn, MaskCheck)
        _, masks = next(iter(loader))
        assert set(masks.unique().tolist()) <= expected_classes


@pytest.mark.parametrize("name, hint", [("voc", "VOCtrainval_11-May-2012.tar"), ("pets", "images.tar.gz"), ("cityscapes", "gtFine_trainvaltest.zip")])
def test_missing_dataset_says_where_and_how(tmp_path, name, hint):
    cfg = compose_config([f"dataset={name}", f"dataset.root={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError) as error:
        build_datasets(OmegaConf.to_container(cfg.dataset, resolve=True))
    message = str(error.value)
    assert message.startswith(f"dataset={name}:") and hint in message and str(tmp_path / "nothing") in message
    assert "dataset.download=true" in message
