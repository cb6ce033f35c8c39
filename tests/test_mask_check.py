"""Mask values are checked on the data side: once per batch, on the CPU, before the transfer
(``segtrain.batches.MaskCheck``, the loaders' collate function), for every dataset."""
from __future__ import annotations

import json
import os

import pytest
import torch
import segtrain.run
from conftest import TINY, TINY_3D, compose_config, run_train_py
from segtrain.build import build
from segtrain.batches import MaskCheck
from segtrain.errors import MaskValueError
from segtrain.registry import DATASETS

USER_DATASET = '''
import torch
from torch.utils.data import Dataset
from segtrain.registry import DATASETS


class Masks(Dataset):
    """A user's dataset whose masks hold `bad_value` in every `bad_every`-th sample."""

    def __init__(self, samples, size, bad_value, bad_every):
        self.samples, self.size, self.bad_value, self.bad_every = samples, size, bad_value, bad_every

    def __len__(self):
        return self.samples

    def __getitem__(self, index):
        mask = torch.zeros(self.size, self.size, dtype=torch.long)
        mask[: self.size // 2] = index % 4
        if self.bad_value is not None and index % self.bad_every == self.bad_every - 1:
            mask[0, 0] = self.bad_value
        return torch.rand(3, self.size, self.size), mask


@DATASETS.register("{name}")
def user_masks(split, size=16, train_samples=8, val_samples=4, bad_value=None, bad_every=3, bad_split="train", **ignored):
    samples = train_samples if split == "train" else val_samples
    return Masks(samples, size if isinstance(size, int) else size[0], bad_value if split == bad_split else None, bad_every)
'''


@pytest.fixture(scope="module")
def user_dataset(tmp_path_factory):
    """A user's dataset module, registered in this process and importable by train.py (imports=[...])."""
    folder = tmp_path_factory.mktemp("user_dataset")
    (folder / "user_masks.py").write_text(USER_DATASET.replace("{name}", "user_masks"))
    if "user_masks" not in DATASETS:
        namespace: dict = {}
        exec(compile(USER_DATASET.replace("{name}", "user_masks"), str(folder / "user_masks.py"), "exec"), namespace)
    return folder


def user_config(*overrides: str) -> list[str]:
    return [*TINY, "dataset.name=user_masks", "trainer.max_epochs=1", "trainer.log_images=0", *overrides]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_mask_value_fails_with_the_values_and_the_keys(user_dataset, tmp_path, workers):
    cfg = compose_config(user_config("+dataset.bad_value=9", f"dataset.num_workers={workers}"))
    with pytest.raises(MaskValueError) as error:
        segtrain.run.train(cfg, tmp_path)
    message = str(error.value)
    # The same message in the training process whether the batch was collated there or in a worker.
    assert message.startswith("dataset=user_masks (train split): target values [9] are outside [0, 4)")
    assert "dataset.ignore_index=None" in message and "set dataset.num_classes" in message
    assert "\n" not in message and "Traceback" not in message
    assert not (tmp_path / "last.pt").exists()


def test_validation_masks_are_checked_too(user_dataset, tmp_path):
    cfg = compose_config(user_config("+dataset.bad_value=-1", "+dataset.bad_split=val", "+dataset.bad_every=1"))
    with pytest.raises(MaskValueError, match=r"dataset=user_masks \(val split\): target values \[-1\]"):
        segtrain.run.train(cfg, tmp_path)


def test_ignore_index_values_pass_and_train(user_dataset, tmp_path):
    segtrain.run.train(compose_config(user_config("+dataset.bad_value=255", "dataset.ignore_index=255")), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["finished"]


def test_a_binary_model_takes_0_and_1_only(user_dataset, tmp_path):
    # bce with two classes: one output channel; the masks here hold classes 0..3.
    cfg = compose_config(user_config("loss=bce", "dataset.num_classes=2", "dataset.class_names=[bg,fg]"))
    with pytest.raises(MaskValueError, match=r"target values \[2, 3\] are outside \[0, 2\).*1-output-channel \(binary\)"):
        segtrain.run.train(cfg, tmp_path)


def test_train_py_prints_one_line(user_dataset, tmp_path):
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(user_dataset), env_path]))
    try:
        process = run_train_py(
            [f"hydra.run.dir={tmp_path}", *user_config("imports=[user_masks]", "+dataset.bad_value=7", "dataset.num_workers=1")]
        )
    finally:
        os.environ["PYTHONPATH"] = env_path
    output = process.stdout + process.stderr
    assert process.returncode == 1, output[-3000:]
    assert "dataset=user_masks (train split): target values [7] are outside [0, 4)" in output
    assert "Traceback" not in output and "DataLoader worker" not in output


@pytest.mark.parametrize("overrides", [TINY, TINY_3D, [*TINY, "loss=bce", "dataset.num_classes=2"]], ids=["shapes", "shapes3d", "binary"])
def test_every_loader_checks_its_batches(overrides):
    components, _ = build(compose_config(list(overrides)))
    channels = 1 if "loss=bce" in overrides else components.num_classes
    for loader, split in ((components.train_loader, "train"), (components.val_loader, "val")):
        assert isinstance(loader.collate_fn, MaskCheck) and loader.collate_fn.channels == channels
        assert loader.collate_fn.where.endswith(f"({split} split)")
        images, masks = next(iter(loader))
        assert masks.dtype == torch.long and images.shape[0] == masks.shape[0]
    assert components.loss_fn.check_targets is False  # the trainer's loss reads nothing back


def test_mask_check_alone():
    check = MaskCheck("mine", "train", channels=3, ignore_index=255)
    samples = [(torch.zeros(1, 2, 2), torch.tensor([[0, 2], [255, 1]], dtype=torch.uint8))] * 2
    images, masks = check(samples)
    assert images.shape == (2, 1, 2, 2) and masks.shape == (2, 2, 2)
    with pytest.raises(MaskValueError, match=r"dataset=mine \(train split\): target values \[3, 254\]"):
        check([(torch.zeros(1, 2, 2), torch.tensor([[3, 254], [255, 1]]))])

