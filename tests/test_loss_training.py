"""`python train.py loss=<name>` learns on the default dataset with every registered loss."""
import json

import pytest
import torch

import segtrain.run
from conftest import CONFIGS, compose_config
from segtrain.registry import DATASETS, LOSSES

SHORT_RUN = [
    "device_list=[]", "dataset.size=32", "dataset.train_samples=128", "dataset.val_samples=16", "dataset.batch_size=8",
    "model.width=8", "model.depth=2", "trainer.max_epochs=3", "trainer.progress_bar=false", "trainer.log_images=0",
    "optimizer.lr=0.01",
]
LOSS_CONFIGS = sorted(path.stem for path in CONFIGS.glob("loss/*.yaml"))


def majority_class_miou() -> float:
    """mIoU of predicting background everywhere on the validation split used below."""
    val = DATASETS.get("shapes")("val", size=32, val_samples=16)
    masks = torch.stack([val[i][1] for i in range(len(val))])
    present = torch.bincount(masks.flatten(), minlength=4) > 0
    return float((masks == 0).float().mean() / present.sum())


def test_every_registered_loss_has_a_config_file():
    missing = [name for name in LOSSES.names() if name not in LOSS_CONFIGS and not name.startswith("test_")]
    assert not missing, f"registered losses without configs/loss/<name>.yaml: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSS_CONFIGS)
def test_every_loss_learns_the_default_dataset(name, tmp_path):
    segtrain.run.train(compose_config([*SHORT_RUN, f"loss={name}"]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    baseline = majority_class_miou()
    assert metrics["best_miou"] > baseline + 0.1, f"loss={name}: best val mIoU {metrics['best_miou']:.3f}, majority class {baseline:.3f}"
