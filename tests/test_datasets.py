import pytest
import torch

from segtrain.registry import DATASETS


def test_deterministic_per_index_and_seed():
    first = DATASETS.get("shapes")("train", size=32, seed=3, cache=False)
    second = DATASETS.get("shapes")("train", size=32, seed=3, cache=False)
    other_seed = DATASETS.get("shapes")("train", size=32, seed=4, cache=False)
    for index in (0, 7):
        assert torch.equal(first[index][0], second[index][0]) and torch.equal(first[index][1], second[index][1])
        assert not torch.equal(first[index][0], other_seed[index][0])


def test_train_and_val_are_disjoint():
    train = DATASETS.get("shapes")("train", size=32, train_samples=64, val_samples=64)
    val = DATASETS.get("shapes")("val", size=32, train_samples=64, val_samples=64)
    train_images = {train[i][0].numpy().tobytes() for i in range(len(train))}
    assert not any(val[i][0].numpy().tobytes() in train_images for i in range(len(val)))


def test_shapes_are_not_trivial():
    dataset = DATASETS.get("shapes")("train", size=64, train_samples=50)
    counts = torch.zeros(4, dtype=torch.long)
    for index in range(len(dataset)):
        image, mask = dataset[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert mask.shape == (64, 64) and mask.dtype == torch.long
        counts += torch.bincount(mask.flatten(), minlength=4)
    assert (counts > 0).all(), "every class occurs"
    # Colour alone does not give the class: shape pixels of different classes overlap in mean colour.
    assert dataset.class_names == ["background", "ellipse", "rectangle", "triangle"]


def test_shapes3d_volumes():
    dataset = DATASETS.get("shapes3d")("val", size=[12, 16, 20], in_channels=1, val_samples=3)
    image, mask = dataset[0]
    assert image.shape == (1, 12, 16, 20) and mask.shape == (12, 16, 20)
    assert dataset.class_names == ["background", "ellipsoid", "box", "octahedron"]


def test_fewer_classes_and_clear_errors():
    binary = DATASETS.get("shapes")("train", num_classes=2, size=32, train_samples=20)
    assert max(int(binary[i][1].max()) for i in range(20)) == 1
    with pytest.raises(ValueError, match="dataset.num_classes=7"):
        DATASETS.get("shapes")("train", num_classes=7)
    with pytest.raises(ValueError, match="dataset.size"):
        DATASETS.get("shapes")("train", size=[32, 32, 32])
