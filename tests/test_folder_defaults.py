"""dataset.mean/std=auto and dataset.size_mode: what a run logs, stores and feeds the model."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segtrain.checkpoint import load_checkpoint
from segtrain.errors import ConfigError
from test_folder_dataset import FAST, datasets, folder_config, write_pairs


@pytest.fixture(autouse=True)
def audit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def pixel_statistics(folder):
    """Per-channel mean and std over every pixel of the RGB images in ``folder``, in [0, 1]."""
    pixels = np.concatenate([np.asarray(Image.open(path), np.float64).reshape(-1, 3) / 255 for path in sorted(folder.iterdir())])
    return pixels.mean(0), pixels.std(0)


def test_size_mode_resize_gives_dataset_size_in_both_splits_and_crop_keeps_whole_val_images(tmp_path, caplog):
    write_pairs(tmp_path, count=5, size=(40, 48))
    with caplog.at_level(logging.INFO, logger="segtrain.datasets.folder"):
        train_set, val_set = datasets(folder_config(tmp_path, "dataset.mask_values=[0,255]", "dataset.size=[20,24]", "dataset.size_mode=resize"))
    for image, mask in (train_set[0], val_set[0]):
        assert image.shape == (1, 20, 24) and mask.shape == (20, 24)
        assert set(mask.unique().tolist()) <= {0, 1}, "masks are resized with nearest: no new values"
    # The bright square (class 1) keeps its share of the image: the whole image was scaled, not cropped.
    _, full_mask = datasets(folder_config(tmp_path, "dataset.mask_values=[0,255]", "dataset.size_mode=crop"))[1][0]
    assert abs(val_set[0][1].float().mean() - full_mask.float().mean()) < 0.05
    assert "dataset.size_mode=resize: whole images are resized to dataset.size=20x24 (the first training image is 40x48)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segtrain.datasets.folder"):
        train_set, val_set = datasets(folder_config(tmp_path, "dataset.mask_values=[0,255]", "dataset.size=[20,24]", "dataset.size_mode=crop"))
    assert train_set[0][0].shape == (1, 20, 24) and val_set[0][0].shape == (1, 40, 48)
    assert "dataset.size_mode=crop: training on random 20x24 crops at full resolution" in caplog.text


def test_unknown_size_mode_names_the_key(tmp_path):
    write_pairs(tmp_path, count=3)
    with pytest.raises(ConfigError, match="dataset.size_mode=squash: use crop"):
        datasets(folder_config(tmp_path, "dataset.mask_values=[0,255]", "dataset.size_mode=squash"))


def test_mean_std_auto_come_from_the_training_images_only(tmp_path):
    write_pairs(tmp_path / "data", "train/images", "train/masks", count=4, rgb=True)
    write_pairs(tmp_path / "data", "val/images", "val/masks", count=2, rgb=True, seed=3)
    # Much brighter validation images: statistics that included them would differ.
    for path in (tmp_path / "data/val/images").iterdir():
        Image.fromarray(np.full((40, 48, 3), 250, np.uint8)).save(path)
    cfg = folder_config(
        tmp_path / "data", "dataset.train_images=train/images", "dataset.train_masks=train/masks", "dataset.val_images=val/images",
        "dataset.val_masks=val/masks", "dataset.mask_values=[0,255]", "dataset.mean=auto", "dataset.std=auto", "dataset.augment=none",
        "dataset.size_mode=resize", "dataset.size=[40,48]",
    )
    train_set, val_set = datasets(cfg)
    mean, std = pixel_statistics(tmp_path / "data/train/images")
    assert np.allclose(train_set.mean, mean, atol=1e-3) and np.allclose(train_set.std, std, atol=1e-3)
    assert val_set.mean == train_set.mean and val_set.std == train_set.std
    images = torch.stack([train_set[i][0] for i in range(len(train_set))])
    assert torch.allclose(images.mean((0, 2, 3)), torch.zeros(3), atol=1e-3), "normalised training images have mean 0"
    assert torch.allclose(images.std((0, 2, 3)), torch.ones(3), atol=1e-2)


def test_train_py_stores_and_logs_auto_normalisation_and_predicts_at_the_input_size(tmp_path, train_py):
    write_pairs(tmp_path / "data", count=6, rgb=True, size=(40, 48))
    mean, std = pixel_statistics(tmp_path / "data/images")  # 5 of the 6 images train; the held-out one shifts the numbers a little
    run_dir = tmp_path / "run"
    common = [
        "dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.train_images=images", "dataset.train_masks=masks",
        "dataset.num_classes=2", "dataset.mask_values=[0,255]",  # dataset.num_workers and dataset.cache: auto
    ]
    process = train_py(
        run_dir, *common, "dataset.size=[20,24]", "dataset.size_mode=resize", "dataset.mean=auto", "dataset.std=auto",
        "dataset.batch_size=2", "trainer.max_epochs=1", *FAST,
    )
    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())["dataset"]
    assert len(resolved["mean"]) == 3 and len(resolved["std"]) == 3, resolved
    assert np.allclose(resolved["mean"], mean, atol=0.05) and np.allclose(resolved["std"], std, atol=0.05)
    stored = load_checkpoint(run_dir / "best.pt")["config"]["dataset"]
    assert stored["mean"] == resolved["mean"] and stored["std"] == resolved["std"], "eval/predict reuse the numbers"
    log = (run_dir / "train.log").read_text()
    assert f"normalising with per-channel mean {resolved['mean']}, std {resolved['std']}" in log
    assert "dataset.size_mode=resize: whole images are resized to dataset.size=20x24 (the first training image is 40x48)" in log
    assert (resolved["num_workers"], resolved["cache"]) == (0, True), "auto resolved and stored: the CPU loads in the training process, 6 small pairs kept"
    assert "dataset.num_workers=auto: 0 on the CPU (the training process loads the data)" in log
    assert "dataset.cache=auto: keeping decoded samples in memory (about 0 MB in all, one copy; the limit is 1024 MB)" in log
    predicted = tmp_path / "predicted"
    train_py(tmp_path / "predict_run", "mode=predict", f"resume={run_dir}", f"predict.input={tmp_path / 'data/images'}", f"predict.output={predicted}")
    with Image.open(predicted / "s0.png") as mask:
        assert mask.size == (48, 40), "a resized run predicts masks of the input's own size"


def test_folder_defaults_resize_and_normalise_isbi_keeps_crops():
    from conftest import compose_config

    folder = compose_config(["dataset=folder"]).dataset
    assert (folder.size_mode, folder.mean, folder.std, folder.num_workers, folder.cache) == ("resize", "auto", "auto", "auto", "auto")
    isbi = compose_config(["dataset=isbi"]).dataset
    assert isbi.size_mode == "crop" and list(isbi.mean) == [0.5]


def test_num_workers_auto_is_zero_on_the_cpu_and_a_few_per_training_process_on_cuda(monkeypatch):
    from segtrain import build

    assert build.loader_workers("auto", torch.device("cpu")) == 0
    assert build.loader_workers(3, torch.device("cpu")) == 3, "a number is used as given"
    cuda = torch.device("cuda", 0)  # only the device type is read: no GPU needed
    monkeypatch.setattr(build.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert build.loader_workers("auto", cuda) == 4, "at most MAX_AUTO_WORKERS"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert build.loader_workers("auto", cuda) == 3, "16 cores for 4 training processes: 3 workers beside each"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert build.loader_workers("auto", cuda) == 1, "at least one"
    for bad in (-1, "two", True, 1.5):
        with pytest.raises(ConfigError, match=f"dataset.num_workers={bad}: use a whole number >= 0"):
            build.loader_workers(bad, torch.device("cpu"))


def test_cache_auto_keeps_what_fits_and_says_so(tmp_path, caplog, monkeypatch):
    from segtrain import build

    write_pairs(tmp_path, count=5, rgb=True, size=(40, 48))
    train_set, val_set = datasets(folder_config(tmp_path, "dataset.mask_values=[0,255]", "dataset.cache=auto", "dataset.augment=none", "dataset.size_mode=resize"))
    exact = sum(array.nbytes for dataset in (train_set, val_set) for index in range(len(dataset)) for array in dataset.read(index))
    assert exact == 5 * (3 * 40 * 48 + 40 * 48), "RGB uint8 images and uint8 class masks"
    assert train_set.decoded_bytes() + val_set.decoded_bytes() == exact, "images of one size: the estimate is exact"
    with caplog.at_level(logging.INFO, logger="segtrain.build"):
        assert build.keep_samples("auto", (train_set, val_set), workers=0) is True
    assert "dataset.cache=auto: keeping decoded samples in memory (about 0 MB in all, one copy; the limit is 1024 MB)" in caplog.text
    first = train_set[0]
    assert train_set._cache.entries.keys() == {0}, "kept after the first read"
    assert all(torch.equal(a, b) for a, b in zip(first, train_set[0])), "a kept sample comes back unchanged"
    monkeypatch.setattr(build, "CACHE_AUTO_BYTES", 2 * exact - 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segtrain.build"):
        assert build.keep_samples("auto", (train_set, val_set), workers=2) is False, "a copy per worker: twice the bytes"
    assert "not keeping decoded samples in memory" in caplog.text and "2 copies, one per loader worker" in caplog.text
    assert "dataset.cache=true keeps them anyway" in caplog.text
    assert train_set._cache.entries is None
    assert build.keep_samples(True, (train_set,), 2) is True and build.keep_samples(None, (train_set,), 0) is None
    with pytest.raises(ConfigError, match="dataset.cache=yes: use true"):
        build.keep_samples("yes", (train_set,), 0)


@pytest.mark.parametrize("ignore_index, dtype", [(None, np.uint8), (255, np.uint8), (-1, np.int16), (1000, np.uint16)])
def test_decoded_masks_are_kept_in_the_smallest_type_and_trained_on_as_int64(tmp_path, ignore_index, dtype):
    write_pairs(tmp_path, count=3, values=(0, 200))
    overrides = ["dataset.mask_values=[0,200]", "dataset.augment=none"]
    if ignore_index is not None:
        overrides.append(f"dataset.ignore_index={ignore_index}")
    train_set, _ = datasets(folder_config(tmp_path, *overrides))
    image, mask = train_set.read(0)
    assert mask.dtype == dtype and set(np.unique(mask).tolist()) <= {0, 1}
    assert train_set[0][1].dtype == torch.int64


def test_depth_auto_follows_the_training_size(caplog):
    from conftest import compose_config
    from segtrain import build

    def depth(size, val_sizes=None):
        return build.unet_depth("auto", {"size": size}, val_sizes or {})

    assert compose_config([]).model.depth == "auto"
    assert depth(compose_config([]).dataset.size) == 3, "the shapes default (64 px) keeps depth 3: its deepest features are 8 px"
    assert depth([176, 240]) == 4, "the shortest side counts: 176 / 2**4 = 11 px"
    assert depth(compose_config(["dataset=isbi"]).dataset.size) == 4, "ISBI's 128 px crops"
    assert depth(1024) == build.MAX_AUTO_DEPTH == 4
    assert depth(20) == depth(3) == 1, "at least one downsampling (the size check names the fix for inputs below 2 px)"
    with caplog.at_level(logging.INFO, logger="segtrain.build"):
        assert build.unet_depth("auto", {"size": None}, {(40, 48): "a.png", (96, 96): "b.png"}) == 2, "no dataset.size: the smallest validation input"
    assert "model.depth=auto: 2 (shortest training side 40 px from a.png: the deepest features are 10 px, at least 8; at most 4)" in caplog.text
    assert build.unet_depth(5, {"size": 64}, {}) == 5, "a number is used as given"
    with pytest.raises(ConfigError, match="model.depth=deep: use a whole number >= 1"):
        build.unet_depth("deep", {"size": 64}, {})
    from segtrain.models.unet import UNet

    with pytest.raises(ValueError, match="model.depth=auto: building a UNet directly needs a whole number"):
        UNet(3, 2, depth="auto")


def test_train_py_stores_the_depth_auto_chose_and_eval_rebuilds_it(tmp_path, train_py):
    write_pairs(tmp_path / "data", count=4, size=(40, 48))
    run_dir = tmp_path / "run"
    fast = [arg for arg in FAST if not arg.startswith("model.depth")]
    train_py(
        run_dir, "dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.train_images=images", "dataset.train_masks=masks",
        "dataset.num_classes=2", "dataset.mask_values=[0,255]", "dataset.size=[32,40]", "dataset.batch_size=2", "trainer.max_epochs=1", *fast,
    )
    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert resolved["model"]["depth"] == 2, "32 px: 2 downsamplings leave 8 px"
    weights = resolved["loss"]["weight"]
    assert len(weights) == 2 and min(weights) == 1.0 and max(weights) > 1.0, f"the default CE's weight=auto: the rarer class up, none down: {weights}"
    checkpoint = load_checkpoint(run_dir / "best.pt")
    assert checkpoint["config"]["model"]["depth"] == 2
    assert {key.split(".")[1] for key in checkpoint["model"] if key.startswith("encoder.")} == {"0", "1", "2"}, "the input block and two downsamplings"
    assert "model.depth=auto: 2 (shortest training side 32 px from dataset.size=[32, 40]" in (run_dir / "train.log").read_text()
    train_py(tmp_path / "eval_run", "mode=eval", f"resume={run_dir}", f"eval.output={tmp_path / 'eval'}")
    assert (tmp_path / "eval" / "eval.json").exists()
