"""dataset=folder: every config key, on image/mask folders written by the tests in tmp_path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, compose_config
from segtrain.build import build, build_datasets
from segtrain.errors import ConfigError
from segtrain.inference import SlidingWindow, sliding_window_logits
from segtrain.transforms import build_transform

FAST = ["device_list=[]", "trainer.progress_bar=false", "trainer.log_images=0", "model.width=4", "model.depth=2"]


@pytest.fixture(autouse=True)
def audit_cache(tmp_path, monkeypatch):
    """Keep the audit cache of each test in its tmp_path, not in ~/.cache."""
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def write_pairs(
    root: Path, images: str = "images", masks: str = "masks", count: int = 6, size: tuple[int, int] = (40, 48),
    image_ext: str = ".png", rgb: bool = False, values: tuple = (0, 255), mask_dtype=np.uint8, seed: int = 0,
) -> list[str]:
    """``count`` image/mask pairs: a bright square (class 1) on a dark background (class 0); returns the stems."""
    rng = np.random.default_rng(seed)
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / masks).mkdir(parents=True, exist_ok=True)
    stems = []
    for index in range(count):
        labels = np.zeros(size, dtype=np.int64)
        top, left = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        labels[top : top + size[0] // 3, left : left + size[1] // 3] = 1
        if len(values) > 2:
            labels[-4:, -4:] = 2
        pixels = (40 + 160 * (labels > 0) + rng.integers(0, 30, size)).astype(np.uint8)
        image = np.stack([pixels, pixels // 2, 255 - pixels], -1) if rgb else pixels
        Image.fromarray(image).save(root / images / f"s{index}{image_ext}")
        # Class c gets pixel value values[c]: an integer, or an (R, G, B) colour.
        mask = np.asarray(values, dtype=np.uint8 if isinstance(values[0], tuple) else mask_dtype)[labels]
        Image.fromarray(mask).save(root / masks / f"s{index}.png")
        stems.append(f"s{index}")
    return stems


def folder_config(root: Path, *overrides: str):
    # These tests were written for random crops and raw [0, 1] pixels; the defaults (resize, auto
    # normalisation) have their own tests in test_folder_defaults.py.
    return compose_config(["dataset=folder", f"dataset.root={root}", "dataset.train_images=images", "dataset.train_masks=masks",
                           "dataset.num_classes=2", "dataset.num_workers=0", "dataset.size=32", "dataset.size_mode=crop",
                           "dataset.mean=null", "dataset.std=null", *FAST, *overrides])


def datasets(cfg):
    from omegaconf import OmegaConf

    return build_datasets(OmegaConf.to_container(cfg.dataset, resolve=True))


@pytest.mark.parametrize("image_ext", [".png", ".jpg", ".tif", ".bmp"])
def test_image_formats_pair_by_stem_with_png_masks(tmp_path, image_ext):
    write_pairs(tmp_path, image_ext=image_ext, count=5)
    train_set, val_set = datasets(folder_config(tmp_path, "dataset.mask_values=[0,255]", "dataset.augment=none"))
    assert len(train_set) == 4 and len(val_set) == 1  # val_fraction 0.2 of 5
    image, mask = train_set[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert mask.shape == (32, 32) and mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 1}
    assert train_set.pairs[0][0].suffix == image_ext and train_set.pairs[0][1].suffix == ".png"
    whole_image, whole_mask = val_set[0]
    assert whole_image.shape == (1, 40, 48) and whole_mask.shape == (40, 48), "validation sees whole images"


def test_val_fraction_split_is_disjoint_reproducible_and_seeded(tmp_path):
    write_pairs(tmp_path, count=20)
    split = lambda *o: [{p[0].stem for p in d.pairs} for d in datasets(folder_config(tmp_path, "dataset.mask_values=[0,255]", *o))]
    train, val = split("dataset.val_fraction=0.25")
    assert len(val) == 5 and len(train) == 15 and not train & val
    assert split("dataset.val_fraction=0.25") == [train, val]
    assert split("dataset.val_fraction=0.25", "seed=1")[1] != val


def test_separate_val_folders_class_names_and_sliding_validation(tmp_path):
    import segtrain.run

    write_pairs(tmp_path / "data", "train/img", "train/lbl", count=8, values=(0, 1))
    write_pairs(tmp_path / "data", "val/img", "val/lbl", count=3, values=(0, 1), size=(50, 50), seed=1)
    cfg = compose_config([
        "dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.train_images=train/img", "dataset.train_masks=train/lbl",
        "dataset.val_images=val/img", "dataset.val_masks=val/lbl", "dataset.num_classes=2", "dataset.class_names=[sky,square]",
        "dataset.num_workers=0", "dataset.size=32", "dataset.batch_size=4", "trainer.max_epochs=1",
        "trainer.val_mode=slide", "trainer.stride=16", *FAST,
    ])
    run_dir = tmp_path / "run"
    segtrain.run.train(cfg, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["final"]["IoU"]) == {"sky", "square"}
    config = (run_dir / "config_resolved.yaml").read_text()
    assert "in_channels: 1" in config, "dataset.in_channels=null is read from the data and saved"


def test_rgb_images_and_in_channels(tmp_path):
    write_pairs(tmp_path, rgb=True, count=4)
    train_set, _ = datasets(folder_config(tmp_path, "dataset.mask_values=[0,255]"))
    assert train_set.in_channels == 3 and train_set[0][0].shape[0] == 3
    gray_set, _ = datasets(folder_config(tmp_path, "dataset.mask_values=[0,255]", "dataset.in_channels=1"))
    assert gray_set[0][0].shape[0] == 1, "RGB files are converted to dataset.in_channels=1"


def test_sixteen_bit_masks_and_images(tmp_path):
    write_pairs(tmp_path, values=(0, 1000, 65535), mask_dtype=np.uint16, count=4)
    for path in (tmp_path / "images").iterdir():  # 16-bit grayscale images
        Image.fromarray((np.array(Image.open(path)).astype(np.uint16) * 257)).save(path)
    cfg = folder_config(tmp_path, "dataset.num_classes=3", "dataset.mask_values=[0,1000,65535]", "dataset.augment=none",
                        "dataset.size=null", "dataset.val_fraction=0.25")
    train_set, _ = datasets(cfg)
    assert Image.open(train_set.pairs[0][1]).mode == "I;16"
    image, mask = train_set[0]
    assert image.max() <= 1 and image.max() > 0.5, "16-bit images are scaled to [0, 1]"
    assert set(mask.unique().tolist()) == {0, 1, 2}


def test_rgb_palette_masks(tmp_path):
    colours = ((0, 0, 0), (255, 0, 0), (0, 0, 255))
    write_pairs(tmp_path, values=colours, count=4)
    cfg = folder_config(tmp_path, "dataset.num_classes=3", "dataset.mask_values=[[0,0,0],[255,0,0],[0,0,255]]",
                        "dataset.augment=none", "dataset.size=null", "dataset.val_fraction=0.25")
    _, mask = datasets(cfg)[0][0]
    assert set(mask.unique().tolist()) == {0, 1, 2} and int(mask[-1, -1]) == 2


def test_mask_values_null_means_value_is_class_and_ignore_index_passes(tmp_path):
    write_pairs(tmp_path, values=(0, 1, 255), count=4)
    cfg = folder_config(tmp_path, "dataset.ignore_index=255", "dataset.augment=none", "dataset.size=null", "dataset.val_fraction=0.25")
    _, mask = datasets(cfg)[0][0]
    assert set(mask.unique().tolist()) == {0, 1, 255}


def test_augmentation_pads_masks_with_the_ignore_index_and_jitters_only_images():
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    mask = torch.randint(0, 3, (20, 24))
    pad = build_transform(True, 32, "none", 255, None, None)
    out_image, out_mask = pad(image, mask)
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
    assert (out_mask == 255).sum() == 32 * 32 - 20 * 24 and (out_image[:, out_mask == 255] == 0).all()
    jitter = build_transform(True, None, [{"color_jitter": 0.5}], 255, [0.5] * 3, [0.5] * 3)
    jittered_image, same_mask = jitter(image, mask)
    assert torch.equal(same_mask, mask) and not torch.allclose(jittered_image, image / 127.5 - 1)
    flipped = build_transform(True, None, [{"hflip": 1.0}], None, None, None)(image, mask)
    assert torch.equal(flipped[1], mask.flip(-1)) and torch.allclose(flipped[0], image.flip(-1) / 255)
    for preset in ("light", "strong"):
        out_image, out_mask = build_transform(True, 16, preset, 255, None, None)(image, mask)
        assert out_image.shape == (3, 16, 16) and set(out_mask.unique().tolist()) <= {0, 1, 2, 255}
    with pytest.raises(ConfigError, match="dataset.augment=heavy: unknown preset; presets: none, light, strong"):
        build_transform(True, 16, "heavy", None, None, None)
    with pytest.raises(ConfigError, match="unknown step 'blur'"):
        build_transform(True, 16, ["hflip", "blur"], None, None, None)


def test_volumes_npy(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        mask = np.zeros((12, 20, 20), dtype=np.uint8)
        mask[3:9, 5:15, 5:15] = 1
        image = (mask[None] * 0.8 + 0.2 * rng.random((2, 12, 20, 20))).astype(np.float32)
        np.save(tmp_path / "images" / f"v{index}.npy", image if index % 2 else image[:1].repeat(2, 0))
        np.save(tmp_path / "masks" / f"v{index}.npy", mask)
    cfg = folder_config(tmp_path, "dataset.size=[8,16,16]", "dataset.augment=[hflip,vflip]", "dataset.val_fraction=0.25",
                        "model=unet3d", "dataset.batch_size=2", "trainer.max_epochs=1", "trainer.val_mode=slide")
    components, run_cfg = build(cfg)
    image, mask = components.train_loader.dataset[0]
    assert image.shape == (2, 8, 16, 16) and mask.shape == (8, 16, 16)
    val_image, val_mask = components.val_loader.dataset[0]
    assert val_image.shape == (2, 12, 20, 20) and val_mask.shape == (12, 20, 20)
    assert run_cfg.dataset.in_channels == 2
    logits = sliding_window_logits(components.model.eval(), val_image[None], SlidingWindow([8, 16, 16]))
    assert logits.shape == (1, 2, 12, 20, 20)


def test_sliding_window_matches_whole_image_for_a_pointwise_model():
    model = torch.nn.Conv2d(3, 4, 1)
    images = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        whole = model(images)
    for window, stride in ((16, 8), ([20, 64], None), (64, 64)):  # overlapping, padded, one window larger than the image
        assert torch.allclose(sliding_window_logits(model, images, SlidingWindow(window, stride)), whole, atol=1e-5)
    with pytest.raises(ConfigError, match="1 <= stride <= window"):
        sliding_window_logits(model, images, SlidingWindow(16, 32))


def test_clear_errors_for_folder_keys(tmp_path):
    write_pairs(tmp_path, count=3)
    with pytest.raises(ConfigError, match="dataset.root=.*nowhere: folder not found"):
        datasets(folder_config(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="dataset.train_masks: folder .*labels does not exist"):
        datasets(folder_config(tmp_path, "dataset.train_masks=labels"))
    with pytest.raises(ConfigError, match=r"dataset.mask_values=\[0, 255, 7\] has 3 entries but dataset.num_classes=2"):
        datasets(folder_config(tmp_path, "dataset.mask_values=[0,255,7]"))
    with pytest.raises(ConfigError, match="dataset.val_images and dataset.val_masks: set both"):
        datasets(folder_config(tmp_path, "dataset.val_images=images"))


@pytest.mark.slow  # starts DataLoader worker processes: ~15 s on a busy 2-core machine
def test_benchmark_data_smoke():
    process = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data.py"), "--smoke"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert process.returncode == 0, process.stderr[-3000:]
    lines = process.stdout
    for name in ("folder+light", "shapes", "train step"):
        assert name in lines, lines
    rows = [line for line in lines.splitlines() if line.startswith("|") and "images/s" not in line and "---" not in line]
    assert len(rows) == 7 and all(float(row.split("|")[-2]) > 0 for row in rows), lines
