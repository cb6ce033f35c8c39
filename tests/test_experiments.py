"""Experiment recipes (configs/experiment/*.yaml): each composes to what it promises and trains."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONFIGS, REPO, TINY_3D, compose_config, run_train_py

RECIPES = sorted(path.stem for path in (CONFIGS / "experiment").glob("*.yaml"))
ISBI = (REPO / ".." / "shared" / "datasets" / "isbi2012-membrane").resolve()
# Small and CPU-only for any recipe: two optimizer steps, no progress bar, no pictures.
TWO_STEPS = ["device_list=[]", "trainer.max_steps=2", "trainer.progress_bar=false", "trainer.log_images=0",
             "model.width=4", "model.depth=2", "dataset.num_workers=0"]


@pytest.fixture(autouse=True)
def audit_cache(tmp_path, monkeypatch):
    """The pre-flight audit's cache in the test's tmp_path, not in ~/.cache."""
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def test_the_recipes_the_readme_names_exist():
    assert {"isbi_membrane", "folder_template", "shapes3d_unet3d"} <= set(RECIPES), RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_only_overrides(recipe):
    """lightning-hydra-template's shape: a global package, one level of `override /group: option`, then values."""
    text = (CONFIGS / "experiment" / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    defaults = yaml.safe_load(text).get("defaults", [])
    for entry in defaults:
        (key,) = entry  # one `group: option` per entry
        assert key.startswith("override /") and (CONFIGS / key.removeprefix("override /")).is_dir(), entry
    assert "python train.py experiment=" in text.split("defaults:")[0], "the header says how to run it"
    compose_config([f"experiment={recipe}"])  # composes with the real configs


def readme_isbi_overrides() -> list[str]:
    """The overrides of the ISBI command README.md measures (its continuation lines joined)."""
    readme = (REPO / "README.md").read_text().replace("\\\n", " ")
    match = re.search(r"OMP_NUM_THREADS=1 python train\.py (dataset=isbi [^\n]*)", readme)
    assert match, "README.md no longer shows the measured ISBI command"
    return [argument for argument in match.group(1).split() if not argument.startswith("device_list=")]


def test_isbi_recipe_is_the_run_the_readme_measures():
    cfg = compose_config(["experiment=isbi_membrane"])
    assert cfg.dataset.name == "folder" and cfg.dataset.root.endswith("isbi2012-membrane")
    assert list(cfg.dataset.mask_values) == [0, 255] and cfg.dataset.in_channels == 1
    assert cfg.loss.name == "bce" and cfg.loss.pos_weight == "auto"
    assert cfg.optimizer.lr == 0.01 and cfg.trainer.max_steps == 150 and cfg.trainer.val_every == 1000
    assert cfg.device_list is None, "the recipe leaves the device to the machine"
    command = readme_isbi_overrides()
    assert "dataset=isbi" in command and "loss=bce" in command, command
    assert cfg == compose_config(command), f"experiment=isbi_membrane differs from README's {command}"


def test_shapes3d_recipe_is_the_3d_unet_on_volumes():
    cfg = compose_config(["experiment=shapes3d_unet3d"])
    assert cfg.dataset.name == "shapes3d" and cfg.model.name == "unet" and cfg.model.dims == 3
    assert cfg == compose_config(["dataset=shapes3d", "model=unet3d"])


def test_folder_template_asks_for_what_has_no_default():
    cfg = compose_config(["experiment=folder_template"])
    assert cfg.dataset.name == "folder" and cfg.model.name == "unet" and cfg.loss.name == "ce"
    missing = {key for key in cfg.dataset if OmegaConf.is_missing(cfg.dataset, key)}
    assert missing == {"root", "num_classes"}
    text = (CONFIGS / "experiment" / "folder_template.yaml").read_text()
    assert "configs/experiment/my_data.yaml" in text.split("defaults:")[0], "the header says where to copy it"
    for key in ("mask_values", "class_names"):  # defaults that rarely fit: marked for the user to fill in
        assert re.search(rf"^  {key}: null +# fill in", text, re.MULTILINE), key


def test_shapes3d_recipe_trains_two_steps(tmp_path):
    import segtrain.run

    tiny = [override for override in TINY_3D if override not in ("dataset=shapes3d", "model=unet3d")]
    assert len(tiny) == len(TINY_3D) - 2  # the recipe, not the tiny settings, picks dataset and model
    cfg = compose_config(["experiment=shapes3d_unet3d", *tiny, "trainer.max_steps=2"])
    segtrain.run.train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["final"]["mIoU"] <= 1
    resolved = yaml.safe_load((tmp_path / "config_resolved.yaml").read_text())
    assert resolved["dataset"]["name"] == "shapes3d" and resolved["model"]["dims"] == 3


def write_square_pairs(root: Path, count: int = 5, size: tuple[int, int] = (36, 40)) -> None:
    """Grayscale images with a bright square; masks 0 (background) / 255 (square), as many users' data."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for index in range(count):
        square = np.zeros(size, dtype=bool)
        top, left = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        square[top : top + size[0] // 3, left : left + size[1] // 3] = True
        image = (40 + 160 * square + rng.integers(0, 30, size)).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"s{index}.png")
        Image.fromarray(np.where(square, 255, 0).astype(np.uint8)).save(root / "masks" / f"s{index}.png")


def test_folder_template_filled_in_trains_two_steps(tmp_path):
    """The template with its ??? and "fill in" keys given on the command line, as a user's copy would hold them."""
    data = tmp_path / "data"
    write_square_pairs(data)
    run_dir = tmp_path / "run"
    process = run_train_py([
        f"hydra.run.dir={run_dir}", "experiment=folder_template", f"dataset.root={data}",
        "dataset.train_images=images", "dataset.train_masks=masks", "dataset.num_classes=2",
        "dataset.mask_values=[0,255]", "dataset.class_names=[background,square]", "dataset.size=32",
        "dataset.batch_size=2", *TWO_STEPS,
    ])
    assert process.returncode == 0, f"{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert set(metrics["final"]["IoU"]) == {"background", "square"}, "class_names reached the metrics"
    assert "data audit: 4 train + 1 val files" in process.stdout + process.stderr


@pytest.mark.skipif(not (ISBI / "images").is_dir(), reason=f"ISBI 2012 data not found at {ISBI}")
def test_isbi_recipe_trains_two_steps(tmp_path):
    process = run_train_py([f"hydra.run.dir={tmp_path}", "experiment=isbi_membrane", "dataset.batch_size=2", *TWO_STEPS])
    assert process.returncode == 0, f"{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 2 and set(metrics["final"]["IoU"]) == {"membrane", "interior"}
    resolved = yaml.safe_load((tmp_path / "config_resolved.yaml").read_text())
    assert resolved["loss"]["name"] == "bce" and resolved["optimizer"]["lr"] == 0.01
    assert isinstance(resolved["loss"]["pos_weight"], list), "pos_weight=auto resolved from the audit's pixel counts"


def test_an_unknown_recipe_fails_naming_the_known_ones(tmp_path):
    process = run_train_py([f"hydra.run.dir={tmp_path}", "experiment=nonexistent"])
    assert process.returncode != 0
    assert "Could not find 'experiment/nonexistent'" in process.stderr, process.stderr[-3000:]
    assert "isbi_membrane" in process.stderr, "Hydra lists the available recipes"
