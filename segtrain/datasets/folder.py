"""Images and masks from folders (``dataset=folder``), paired by file stem.

``a.jpg`` in the image folder pairs with ``a.png`` in the mask folder. Images: png, jpg,
tif or bmp, grayscale or RGB, 8 or 16 bit. Masks: 8- or 16-bit grayscale, palette, or
RGB colour-coded (with ``mask_values`` triplets). Volumes (3D): ``.npy`` files, image
``(D, H, W)`` or ``(C, D, H, W)``, mask ``(D, H, W)``.

Mask pixel values become class indices through :class:`MaskEncoder`: ``mask_values[c]``
is the value (or ``[R, G, B]`` colour) of class ``c``; without ``mask_values`` the value
is the class index. The pre-flight audit (:mod:`segtrain.audit`) checks every pair once
before training, so that a bad file is named at start-up, not in a worker mid-epoch.
"""
from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segtrain.datasets.sample_cache import SampleCache
from segtrain.errors import ConfigError
from segtrain.registry import DATASETS
from segtrain.transforms import PairTransform, build_transform

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")  # fine for images; a mask's labels would be changed at every edge
VOLUME_EXTENSIONS = (".npy",)


class MaskEncoder:
    """Turns raw mask pixel values into class indices (``-1`` marks a value with no class).

    Grayscale values are integers; colours are packed as ``R << 16 | G << 8 | B``.
    """

    def __init__(
        self, num_classes: int, ignore_index: int | None, mask_values: Sequence[Any] | None, ignore_values: Sequence[int] = ()
    ) -> None:
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        # Raw values mapped to the ignore index besides the ignore index itself (Cityscapes' unused ids).
        self.ignore_values = np.asarray(sorted(ignore_values), dtype=np.int64)
        if len(self.ignore_values) and ignore_index is None:
            raise ConfigError("dataset.ignore_index=null: this dataset maps unused label ids to the ignore index; set one (e.g. 255)")
        self.mask_values = None if mask_values is None else [list(v) if isinstance(v, Sequence) else v for v in mask_values]
        self.rgb = bool(self.mask_values) and isinstance(self.mask_values[0], list)
        if self.mask_values is None:
            return
        if len(self.mask_values) != self.num_classes:
            raise ConfigError(
                f"dataset.mask_values={self.mask_values} has {len(self.mask_values)} entries but dataset.num_classes="
                f"{self.num_classes}: give one pixel value per class, in class order"
            )
        if self.rgb:
            if not all(isinstance(v, list) and len(v) == 3 and all(0 <= int(c) <= 255 for c in v) for v in self.mask_values):
                raise ConfigError(f"dataset.mask_values={self.mask_values}: colour masks need one [R, G, B] triplet (0..255) per class")
            keys = [int(r) << 16 | int(g) << 8 | int(b) for r, g, b in self.mask_values]
        else:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in self.mask_values):
                raise ConfigError(f"dataset.mask_values={self.mask_values}: use integers (grayscale masks) or [R, G, B] triplets, not a mix")
            keys = list(self.mask_values)
            if ignore_index is not None and ignore_index in keys:
                raise ConfigError(
                    f"dataset.ignore_index={ignore_index} is also the pixel value of class {keys.index(ignore_index)} in "
                    f"dataset.mask_values={self.mask_values}: pick an ignore index that is not a class value"
                )
        if len(set(keys)) != len(keys):
            raise ConfigError(f"dataset.mask_values={self.mask_values}: two classes share a pixel value")
        order = np.argsort(keys)
        self._keys = np.asarray(keys, dtype=np.int64)[order]
        self._classes = order.astype(np.int64)

    def classes_of(self, values: np.ndarray) -> np.ndarray:
        """Class index of each raw value (any shape), the ignore index for ignored values, -1 for unknown ones."""
        values = values.astype(np.int64, copy=False)
        if self.mask_values is None:
            known = (values >= 0) & (values < self.num_classes)
            classes = np.where(known, values, -1)
        else:
            position = np.clip(np.searchsorted(self._keys, values), 0, len(self._keys) - 1)
            classes = np.where(self._keys[position] == values, self._classes[position], -1)
        if self.ignore_index is not None and not self.rgb:
            classes = np.where((values == self.ignore_index) | np.isin(values, self.ignore_values), self.ignore_index, classes)
        return classes

    @property
    def compact_dtype(self) -> np.dtype:
        """The smallest integer type holding every class index and the ignore index."""
        values = [0, self.num_classes - 1, *([] if self.ignore_index is None else [int(self.ignore_index)])]
        return np.dtype(np.result_type(np.min_scalar_type(min(values)), np.min_scalar_type(max(values))))

    def encode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Class-index mask (int64) from a raw mask; raises naming the file for unknown values."""
        classes = self.classes_of(raw)
        if (classes < 0).any():
            unknown = np.unique(raw[classes < 0])[:8]
            raise ValueError(f"{path}: mask values {[self.describe(v) for v in unknown]} belong to no class ({self.expected()})")
        return classes

    def describe(self, value: int) -> str:
        value = int(value)
        return f"[{value >> 16 & 255}, {value >> 8 & 255}, {value & 255}]" if self.rgb else str(value)

    def expected(self) -> str:
        valid = f"dataset.mask_values={self.mask_values}" if self.mask_values is not None else f"[0, {self.num_classes}) with dataset.num_classes={self.num_classes}"
        return valid + (f", ignore {self.ignore_index}" if self.ignore_index is not None else "")


def read_image(path: Path) -> np.ndarray:
    """Image ``(C, H, W)`` (uint8, uint16 or float32) or volume ``(C, D, H, W)`` from ``.npy``."""
    if path.suffix.lower() in VOLUME_EXTENSIONS:
        volume = np.load(path)
        return volume[None] if volume.ndim == 3 else volume
    with Image.open(path) as image:
        if image.mode in ("P", "RGBA", "LA", "CMYK", "YCbCr"):
            image = image.convert("RGB" if image.mode != "LA" else "L")
        array = np.array(image)
    if array.dtype == np.int32:  # PIL's "I" mode: 16-bit data widened
        array = array.astype(np.uint16) if array.min() >= 0 and array.max() < 2**16 else array.astype(np.float32)
    if array.dtype not in (np.uint8, np.uint16):
        array = array.astype(np.float32)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def read_mask(path: Path, rgb: bool) -> np.ndarray:
    """Raw mask values ``(H, W)`` (or ``(D, H, W)``); colours packed as ``R << 16 | G << 8 | B`` when ``rgb``."""
    if path.suffix.lower() in VOLUME_EXTENSIONS:
        return np.load(path)
    with Image.open(path) as image:
        if rgb:
            array = np.array(image.convert("RGB")).astype(np.int64)
            return array[..., 0] << 16 | array[..., 1] << 8 | array[..., 2]
        if image.mode == "P":
            return np.array(image)  # palette indices are the values (VOC's class ids)
        array = np.array(image)
    if array.ndim == 3:
        if not (array[..., :3] == array[..., :1]).all():
            raise ValueError(
                f"{path}: the mask is in colour but dataset.mask_values holds integers (or is null): "
                "set dataset.mask_values to one [R, G, B] triplet per class"
            )
        array = array[..., 0]
    return array


def image_channels(path: Path) -> int:
    """Channels of an image file, from its header (or a memory map for ``.npy``)."""
    if path.suffix.lower() in VOLUME_EXTENSIONS:
        shape = np.load(path, mmap_mode="r").shape
        return 1 if len(shape) == 3 else shape[0]
    with Image.open(path) as image:
        return 3 if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else 1


@dataclass
class Pairing:
    pairs: list[tuple[Path, Path]]
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_masks: list[Path] = field(default_factory=list)


def pair_by_stem(image_dir: Path, mask_dir: Path, key: str) -> Pairing:
    """Pairs ``image_dir/a.*`` with ``mask_dir/a.*``; ``key`` names the config keys in errors."""
    for folder, which in ((image_dir, "images"), (mask_dir, "masks")):
        broken = broken_link(folder)
        if broken:
            raise ConfigError(f"dataset.{key}_{which}: {broken}")
        if not folder.is_dir():
            raise ConfigError(f"dataset.{key}_{which}: folder {folder} does not exist (relative paths resolve against dataset.root)")
    images, masks = _by_stem(image_dir, f"dataset.{key}_images"), _by_stem(mask_dir, f"dataset.{key}_masks")
    lossy = [path for path in masks.values() if path.suffix.lower() in LOSSY_EXTENSIONS]
    if lossy:
        raise ConfigError(
            f"dataset.{key}_masks: masks must be lossless (PNG, TIFF or BMP); {lossy[0]} is JPEG"
            + (f" (and {len(lossy) - 1} more in {mask_dir})" if len(lossy) > 1 else "")
            + ": its compression changes label values at every edge. Re-export the masks as PNG from their source"
        )
    pairs = [(images[stem], masks[stem]) for stem in sorted(images) if stem in masks]
    return Pairing(
        pairs,
        [images[stem] for stem in sorted(images) if stem not in masks],
        [masks[stem] for stem in sorted(masks) if stem not in images],
    )


def _by_stem(folder: Path, key: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS + VOLUME_EXTENSIONS or path.name.startswith("."):
            continue
        if path.stem in files:
            raise ConfigError(f"{key}: {files[path.stem].name} and {path.name} in {folder} share the stem {path.stem!r}; keep one")
        broken = broken_link(path)
        if broken:
            raise ConfigError(f"{key}: {broken}")
        files[path.stem] = path
    return files


def broken_link(path: Path) -> str | None:
    """What is wrong with ``path`` if it is a symbolic link loop or a link to nothing (a sentence naming it), else None."""
    if not path.is_symlink() and path.exists():
        return None
    try:
        os.stat(path)
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop ({path} -> {os.readlink(path) if path.is_symlink() else '...'}); point the link at a real file or folder, or remove it"
        if path.is_symlink():
            return f"{path} is a symbolic link to nothing ({path} -> {os.readlink(path)}); point it at a real file or folder, or remove it"
        return None


class SegmentationFiles(Dataset):
    """(image, mask) pairs of files, read, encoded to class indices and transformed.

    Returns ``image`` float32 ``(C, *spatial)`` and ``mask`` int64 ``(*spatial)``.
    ``unpaired_images`` / ``unpaired_masks`` are kept for the audit to report.
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        encoder: MaskEncoder,
        transform: PairTransform,
        in_channels: int | None,
        split: str,
        unpaired_images: list[Path] | None = None,
        unpaired_masks: list[Path] | None = None,
        class_names: list[str] | None = None,
        cache: bool = False,
    ) -> None:
        self.pairs, self.encoder, self.transform, self.split = pairs, encoder, transform, split
        # Decoded (image, class mask) arrays by index, per DataLoader worker: for small data sets
        # whose decoding (a 512x512 PNG: tens of ms) would dominate the step.
        self._cache = SampleCache(cache)
        self.unpaired_images, self.unpaired_masks = unpaired_images or [], unpaired_masks or []
        if class_names is not None:
            self.class_names = list(class_names)
        # dataset.in_channels=null: the first image decides; other files are converted to match.
        self.in_channels = int(in_channels) if in_channels is not None else (image_channels(pairs[0][0]) if pairs else 3)
        # The normalisation applied (``dataset.mean/std=auto`` resolved), for config_resolved.yaml.
        self.mean: list[float] | None = None
        self.std: list[float] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._cache.get(index, self.read)
        # Copies: the transforms must never write into cached arrays.
        return self.transform(torch.from_numpy(image.copy()), torch.from_numpy(mask.copy()))

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded image ``(C, *spatial)`` with ``in_channels`` channels and its class-index mask
        (the smallest integer type that holds the classes and the ignore index: a kept mask is small;
        the transforms make it int64)."""
        image_path, mask_path = self.pairs[index]
        image = self._channels(read_image(image_path), image_path)
        mask = self.encoder.encode(read_mask(mask_path, self.encoder.rgb), mask_path)
        return np.ascontiguousarray(image), mask.astype(self.encoder.compact_dtype, copy=False)

    def keep_samples(self, enabled: bool) -> None:
        """Keep decoded samples in memory from now on (``dataset.cache``, resolved by the builder for ``auto``)."""
        self._cache = SampleCache(enabled)

    def decoded_bytes(self, samples: int = 8) -> int:
        """About how many bytes the decoded split takes in memory (``read`` of up to ``samples``
        evenly spaced pairs, times the number of pairs): what ``dataset.cache`` would keep."""
        if not self.pairs:
            return 0
        chosen = np.unique(np.linspace(0, len(self.pairs) - 1, min(samples, len(self.pairs))).round().astype(int))
        sizes = [sum(array.nbytes for array in self.read(int(index))) for index in chosen]
        return int(np.mean(sizes) * len(self.pairs))

    def _channels(self, image: np.ndarray, path: Path) -> np.ndarray:
        return convert_channels(image, self.in_channels, path)


def convert_channels(image: np.ndarray, in_channels: int, path: Path) -> np.ndarray:
    """``image`` ``(C, ...)`` with ``in_channels`` channels: gray repeated, RGB to gray by luma."""
    channels = image.shape[0]
    if channels == in_channels:
        return image
    if channels == 1:
        return np.repeat(image, in_channels, axis=0)
    if in_channels == 1 and channels == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, *([1] * (image.ndim - 1)))
        gray = (image.astype(np.float32) * weights).sum(0, keepdims=True)
        return gray.astype(image.dtype) if image.dtype != np.float32 else gray
    raise ValueError(f"{path}: {channels} channels, but dataset.in_channels={in_channels}")


# Images at most read for ``dataset.mean/std=auto`` (evenly spaced over the training split): enough
# for per-channel statistics, and a bound on the start-up time of large data sets.
STATISTICS_IMAGES = 256
_statistics: dict[tuple, tuple[list[float], list[float], int]] = {}  # per process: the train and val splits share one pass


def channel_statistics(images: list[Path], in_channels: int) -> tuple[list[float], list[float], int]:
    """Per-channel mean and std of ``images`` after scaling to [0, 1] as the transforms do
    (8-bit / 255, 16-bit / 65535, float as is), and how many images were read."""
    key = (tuple(images), in_channels)
    if key in _statistics:
        return _statistics[key]
    chosen = [images[int(i)] for i in np.linspace(0, len(images) - 1, min(len(images), STATISTICS_IMAGES))] if images else []

    def sums(path: Path) -> np.ndarray:
        image = convert_channels(read_image(path), in_channels, path)
        scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(image.dtype, 1.0)
        flat = image.reshape(in_channels, -1).astype(np.float64) / scale
        return np.stack([flat.sum(1), (flat**2).sum(1), np.full(in_channels, flat.shape[1])])

    with ThreadPoolExecutor(max_workers=4) as pool:  # PNG/JPEG decoding releases the GIL
        total = sum(pool.map(sums, chosen), np.zeros((3, in_channels)))
    count = np.maximum(total[2], 1)
    mean = total[0] / count
    std = np.sqrt(np.maximum(total[1] / count - mean**2, 0))
    # A constant channel would divide by 0: leave its scale alone.
    result = ([round(float(m), 4) for m in mean], [round(float(s), 4) if s > 1e-6 else 1.0 for s in std], len(chosen))
    _statistics[key] = result
    return result


def resolve_normalisation(
    mean: Any, std: Any, train_images: list[Path], in_channels: int, announce: bool = True
) -> tuple[list[float] | None, list[float] | None]:
    """``dataset.mean`` / ``dataset.std`` with ``auto`` replaced by the training images' statistics
    (logged when ``announce``: once per run, by the training split)."""
    if mean != "auto" and std != "auto":
        return mean, std
    auto_mean, auto_std, read = channel_statistics(train_images, in_channels)
    if announce:
        log.info(
            "dataset.mean=%s, dataset.std=%s: normalising with per-channel mean %s, std %s (%d of the %d training images read, scaled to [0, 1])",
            mean, std, auto_mean if mean == "auto" else mean, auto_std if std == "auto" else std, read, len(train_images),
        )
    return auto_mean if mean == "auto" else mean, auto_std if std == "auto" else std


def describe_size(size_mode: str, size: Any, first_image: Path | None) -> str:
    """The log line saying what dataset.size does to these images."""
    target = [int(size)] * 2 if isinstance(size, int) else [int(s) for s in size]
    wanted = "x".join(map(str, target))
    found, aspect = "", ""
    if first_image is not None and first_image.suffix.lower() not in VOLUME_EXTENSIONS:
        with Image.open(first_image) as image:
            found = f" (the first training image is {image.height}x{image.width})"
            if len(target) == 2 and abs(math.log((image.width / image.height) / (target[1] / target[0]))) > 0.1:
                aspect = (
                    f"; this changes the aspect ratio: give dataset.size=[H,W] in the images' proportions "
                    f"(e.g. [{target[0]},{round(target[0] * image.width / image.height)}]) or use dataset.size_mode=crop"
                )
    if size_mode == "resize":
        return (
            f"dataset.size_mode=resize: whole images are resized to dataset.size={wanted}{found} for training and validation "
            f"(masks nearest); val metrics are computed at that size{aspect}"
        )
    return f"dataset.size_mode=crop: training on random {wanted} crops at full resolution{found}; validation on whole images at full resolution"


def split_off(pairs: list[tuple[Path, Path]], fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded, disjoint split of ``pairs`` with ``fraction`` (at least one pair) held out."""
    if not 0 < fraction < 1:
        raise ConfigError(f"dataset.val_fraction={fraction}: with dataset.val_images=null, hold out a fraction in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(pairs))
    held_out = max(1, round(fraction * len(pairs))) if len(pairs) > 1 else 0
    val = sorted(int(i) for i in order[:held_out])
    train = sorted(int(i) for i in order[held_out:])
    return [pairs[i] for i in train], [pairs[i] for i in val]


@DATASETS.register("folder")
def folder(
    split: str,
    root: str,
    train_images: str,
    train_masks: str,
    num_classes: int,
    val_images: str | None = None,
    val_masks: str | None = None,
    val_fraction: float = 0.2,
    in_channels: int | None = None,
    ignore_index: int | None = None,
    class_names: list[str] | None = None,
    mask_values: list[Any] | None = None,
    size: int | list[int] | None = None,
    augment: str | list[Any] | None = "light",
    mean: list[float] | str | None = None,
    std: list[float] | str | None = None,
    seed: int = 0,
    cache: bool = False,
    size_mode: str = "crop",
) -> SegmentationFiles:
    """Your images and masks: see ``configs/dataset/folder.yaml`` for every key."""
    root_path = Path(root)
    broken = broken_link(root_path)
    if broken:
        raise ConfigError(f"dataset.root={root}: {broken}")
    if not root_path.is_dir():
        raise ConfigError(f"dataset.root={root}: folder not found (relative to {Path.cwd()}, where train.py was started)")
    if (val_images is None) != (val_masks is None):
        raise ConfigError("dataset.val_images and dataset.val_masks: set both (a separate val split) or neither (split by dataset.val_fraction)")
    if split == "train" or val_images is None:
        pairing = pair_by_stem(root_path / train_images, root_path / train_masks, "train")
    else:
        pairing = pair_by_stem(root_path / val_images, root_path / val_masks, "val")
    pairs = train_pairs = pairing.pairs
    if val_images is None:
        train_pairs, val_pairs = split_off(pairs, val_fraction, seed)
        pairs = train_pairs if split == "train" else val_pairs
    elif split != "train" and "auto" in (mean, std):  # the statistics come from the training images
        train_pairs = pair_by_stem(root_path / train_images, root_path / train_masks, "train").pairs
    dims = 3 if pairs and pairs[0][0].suffix.lower() in VOLUME_EXTENSIONS else 2
    if dims == 3 and size_mode == "resize":  # the 2D default; volumes have no resize step
        size_mode = "crop"
    if split == "train" and size is not None:
        log.info(describe_size(size_mode, size, pairs[0][0] if pairs else None))
    channels = int(in_channels) if in_channels is not None else (image_channels(train_pairs[0][0]) if train_pairs else 3)
    mean, std = resolve_normalisation(mean, std, [image for image, _ in train_pairs], channels, announce=split == "train")
    transform = build_transform(split == "train", size, augment, ignore_index, mean, std, dims=dims, size_mode=size_mode)
    dataset = SegmentationFiles(
        pairs, MaskEncoder(num_classes, ignore_index, mask_values), transform, in_channels, split,
        pairing.unpaired_images, pairing.unpaired_masks, class_names, cache,
    )
    dataset.mean, dataset.std = mean, std
    return dataset
