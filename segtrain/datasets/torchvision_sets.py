"""torchvision's segmentation datasets on disk: PASCAL VOC 2012, Oxford-IIIT Pet, Cityscapes.

torchvision's dataset classes check the on-disk layout and list the files; samples are
then read like ``dataset=folder`` (:class:`SegmentationFiles`), so they get the same
augmentation, mask encoding and pre-flight audit. Nothing is downloaded unless
``dataset.download=true``; when files are missing the error says where they must go.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


from segtrain.datasets.folder import MaskEncoder, SegmentationFiles
from segtrain.errors import ConfigError
from segtrain.registry import DATASETS
from segtrain.transforms import build_transform


def files_dataset(
    split: str,
    pairs: list[tuple[Path, Path]],
    num_classes: int,
    ignore_index: int | None,
    mask_values: list[Any] | None,
    size: int | list[int] | None,
    augment: str | list[Any] | None,
    mean: list[float] | None,
    std: list[float] | None,
    in_channels: int | None,
    class_names: list[str] | None,
    ignore_values: tuple[int, ...] = (),
) -> SegmentationFiles:
    transform = build_transform(split == "train", size, augment, ignore_index, mean, std)
    encoder = MaskEncoder(num_classes, ignore_index, mask_values, ignore_values)
    return SegmentationFiles(pairs, encoder, transform, in_channels, split, class_names=class_names)


def open_torchvision(name: str, make: Callable[[], Any], where: str, how: str) -> Any:
    """``make()``, with torchvision's "not found" errors turned into where-and-how messages."""
    try:
        return make()
    except (RuntimeError, FileNotFoundError) as error:
        raise ConfigError(
            f"dataset={name}: {error}. Expected {where}. {how} (nothing is downloaded unless dataset.download=true)"
        ) from None


@DATASETS.register("voc")
def voc(split: str, root: str, download: bool = False, **params: Any) -> SegmentationFiles:
    """PASCAL VOC 2012 segmentation: 21 classes, 255 marks object borders (ignored)."""
    from torchvision import datasets
    base = Path(root) / "VOCdevkit" / "VOC2012"
    found = open_torchvision(
        "voc",
        lambda: datasets.VOCSegmentation(root, year="2012", image_set=split, download=download),
        f"{base}/JPEGImages/*.jpg, {base}/SegmentationClass/*.png and {base}/ImageSets/Segmentation/{split}.txt",
        f"Download VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and extract it in {root}",
    )
    return files_dataset(split, [(Path(i), Path(m)) for i, m in zip(found.images, found.masks)], **params)


@DATASETS.register("pets")
def pets(split: str, root: str, download: bool = False, **params: Any) -> SegmentationFiles:
    """Oxford-IIIT Pet trimaps (pixel 1 pet, 2 background, 3 border); train = trainval, val = test."""
    from torchvision import datasets
    base = Path(root) / "oxford-iiit-pet"
    found = open_torchvision(
        "pets",
        lambda: datasets.OxfordIIITPet(root, split="trainval" if split == "train" else "test", target_types="segmentation", download=download),
        f"{base}/images/*.jpg, {base}/annotations/trimaps/*.png and {base}/annotations/{{trainval,test}}.txt",
        f"Download images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ and extract both in {base}",
    )
    # torchvision keeps the file lists private; they are the documented layout above.
    return files_dataset(split, list(zip(found._images, found._segs)), **params)


@DATASETS.register("cityscapes")
def cityscapes(split: str, root: str, download: bool = False, **params: Any) -> SegmentationFiles:
    """Cityscapes fine annotations: the 19 train ids; every other label id is mapped to the ignore index."""
    from torchvision import datasets
    if download:
        raise ConfigError("dataset.download=true: Cityscapes needs a login; download it by hand from https://www.cityscapes-dataset.com")
    found = open_torchvision(
        "cityscapes",
        lambda: datasets.Cityscapes(root, split=split, mode="fine", target_type="semantic"),
        f"{root}/leftImg8bit/{split}/<city>/*_leftImg8bit.png and {root}/gtFine/{split}/<city>/*_gtFine_labelIds.png",
        "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com "
        f"(free login) and extract both in {root}",
    )
    unused = tuple(c.id for c in datasets.Cityscapes.classes if c.train_id in (255, -1) and c.id >= 0)
    pairs = sorted((Path(image), Path(targets[0])) for image, targets in zip(found.images, found.targets))
    return files_dataset(split, pairs, ignore_values=unused, **params)
