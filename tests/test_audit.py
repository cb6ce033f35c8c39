"""The pre-flight data audit: every failure names files and the fix; counts feed auto weights; the cache."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import run_train_py
from segtrain.audit import AuditError
from segtrain.build import build, build_audit
from segtrain.errors import ConfigError
from test_folder_dataset import folder_config, write_pairs


@pytest.fixture(autouse=True)
def audit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def audit_error(root, *overrides) -> str:
    with pytest.raises(AuditError) as error:
        build_audit(folder_config(root, *overrides))
    return str(error.value)


def test_clean_data_passes_and_counts_pixels(tmp_path):
    write_pairs(tmp_path, count=10, values=(0, 255))
    report = build_audit(folder_config(tmp_path, "dataset.mask_values=[0,255]", "dataset.class_names=[bg,fg]"))
    masks = [np.array(Image.open(path)) for path in sorted((tmp_path / "masks").iterdir())]
    total_fg = sum(int((mask == 255).sum()) for mask in masks)
    assert report.files == {"train": 8, "val": 2}
    assert int(report.pixel_counts["train"][1] + report.pixel_counts["val"][1]) == total_fg
    assert int(sum(c.sum() for c in report.pixel_counts.values())) == sum(mask.size for mask in masks)
    table = report.table()
    assert table.splitlines()[0].split()[:2] == ["class", "train"] and "bg" in table and "fg" in table
    assert report.warnings == []


def test_values_0_and_255_with_two_classes_suggest_mask_values(tmp_path):
    write_pairs(tmp_path, count=4, values=(0, 255))
    message = audit_error(tmp_path)
    assert "mask values belong to no class: 255 (in 3 files, e.g. s" in message
    assert "masks hold 0 and 255 but dataset.num_classes=2: set dataset.mask_values=[0,255]" in message.replace("The masks", "masks")


def test_too_many_values_and_ignore_index(tmp_path):
    write_pairs(tmp_path, count=4, values=(0, 1, 7))
    message = audit_error(tmp_path)
    assert "7 (in" in message and "3 distinct values (0, 1, 7) for dataset.num_classes=2" in message
    # 7 as the "do not care" value: passes, and its pixels are counted as ignored, not as a class.
    report = build_audit(folder_config(tmp_path, "dataset.ignore_index=7"))
    assert report.ignored_pixels["train"] > 0


def test_unpaired_files_are_listed(tmp_path):
    write_pairs(tmp_path, count=5, values=(0, 1))
    for index in range(7):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / f"orphan{index}.png")
    (tmp_path / "masks" / "s1.png").rename(tmp_path / "masks" / "s1_mask.png")
    message = audit_error(tmp_path)
    assert "8 images without a mask of the same file stem" in message
    assert "orphan0.png, orphan1.png" in message and "and 3 more" in message
    assert "1 masks without a image" in message or "1 masks without an image" in message
    assert "s1_mask.png" in message


def test_size_mismatch_and_unreadable_files(tmp_path):
    write_pairs(tmp_path, count=5, values=(0, 1))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "masks" / "s2.png")
    (tmp_path / "masks" / "s3.png").write_bytes(b"not a png at all")
    message = audit_error(tmp_path)
    assert "images differ in size from their masks: s2.png 40x48 vs mask 10x10" in message
    assert "1 unreadable files:" in message and "s3.png" in message


def test_empty_split(tmp_path):
    write_pairs(tmp_path, count=1, values=(0, 1))
    with pytest.raises(ConfigError, match="the val split is empty"):
        build_audit(folder_config(tmp_path))  # one pair: nothing left to hold out


def test_validation_batches_of_whole_images_need_equal_sizes(tmp_path):
    write_pairs(tmp_path / "d", "train/i", "train/m", count=4, values=(0, 1))
    write_pairs(tmp_path / "d", "val/i", "val/m", count=1, values=(0, 1), size=(30, 30))
    Image.fromarray(np.zeros((36, 36), np.uint8)).save(tmp_path / "d" / "val/i/big.png")
    Image.fromarray(np.zeros((36, 36), np.uint8)).save(tmp_path / "d" / "val/m/big.png")
    overrides = [f"dataset.root={tmp_path / 'd'}", "dataset.train_images=train/i", "dataset.train_masks=train/m",
                 "dataset.val_images=val/i", "dataset.val_masks=val/m"]
    message = audit_error(tmp_path, *overrides, "dataset.val_batch_size=2")
    assert "dataset.val_batch_size=2 but the validation images have 2 different sizes" in message
    assert "set dataset.val_batch_size=1" in message
    build_audit(folder_config(tmp_path, *overrides, "dataset.val_batch_size=1"))


def test_absent_class_warns(tmp_path):
    write_pairs(tmp_path, count=4, values=(0, 1))
    report = build_audit(folder_config(tmp_path, "dataset.num_classes=3", "dataset.class_names=[bg,square,never]"))
    assert report.warnings and "never occur in the training masks: never" in report.warnings[0]


def test_cache_reuses_unchanged_files_and_rereads_changed_ones(tmp_path):
    write_pairs(tmp_path, count=6, values=(0, 1))
    cfg = folder_config(tmp_path)
    first = build_audit(cfg)
    assert first.cached_files == 0 and list((tmp_path / "cache" / "audit").glob("*.json"))
    assert build_audit(cfg).cached_files == 6
    Image.fromarray(np.full((40, 48), 5, np.uint8)).save(tmp_path / "masks" / "s0.png")  # now holds a bad value
    with pytest.raises(AuditError, match="5 \\(in 1 files, e.g. s0.png\\)"):
        build_audit(cfg)


def test_audit_counts_feed_auto_class_weights(tmp_path, monkeypatch):
    write_pairs(tmp_path, count=5, values=(0, 1))
    import segtrain.build

    def fail(*args):
        raise AssertionError("auto weights must come from the audit, not a pass over the dataset")

    monkeypatch.setattr(segtrain.build, "class_pixel_counts", fail)
    cfg = folder_config(tmp_path, "loss=ce", "loss.weight=auto")
    components, run_cfg = build(cfg)
    report = build_audit(cfg)
    counts = report.pixel_counts["train"].astype(float)
    frequency = counts / counts.sum()
    median = np.median(frequency)
    assert np.allclose(run_cfg.loss.weight, np.maximum(1, median / frequency), rtol=1e-4)


def test_mode_audit_prints_the_table_and_fails_with_the_fix(tmp_path):
    write_pairs(tmp_path / "data", count=5, values=(0, 255))
    common = [f"hydra.run.dir={tmp_path / 'run'}", "mode=audit", "dataset=folder", f"dataset.root={tmp_path / 'data'}",
              "dataset.train_images=images", "dataset.train_masks=masks", "dataset.num_classes=2"]
    process = run_train_py([*common, "dataset.mask_values=[0,255]"])
    assert process.returncode == 0, process.stderr[-2000:]
    assert "class_0" in process.stdout and "train pixels" in process.stdout and "data audit passed: 5 files" in process.stdout
    assert not (tmp_path / "run" / "metrics.json").exists(), "audit mode does not train"
    process = run_train_py(common)
    assert process.returncode != 0
    output = process.stdout + process.stderr
    assert "set dataset.mask_values=[0,255]" in output and "Traceback" not in output
