"""Paired image + mask transforms, built from ``dataset.augment``.

2D pipelines are ``torchvision.transforms.v2`` with ``tv_tensors.Image`` and
``tv_tensors.Mask``: v2 applies every geometric step to both, resizes masks with nearest
and fills masks with the value given for ``tv_tensors.Mask`` (the ignore index), so
nothing here is a hand-written joint transform. Volumes (3D) get a random crop and
flips along each axis (v2 has no 3D kernels).

``dataset.size_mode`` says how samples are brought to ``dataset.size`` so that they batch:
``crop`` takes a random crop at full resolution in training (padded where the image is
smaller) and validates on whole images; ``resize`` scales whole images to ``dataset.size``
(bilinear with antialiasing, masks nearest) in training and validation alike.
``dataset.augment`` adds steps after the crop or resize.

torchvision is imported inside the functions: it costs about 2 s at every ``train.py``
start, which the generated datasets do not need.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from segtrain.errors import ConfigError

if TYPE_CHECKING:
    from torchvision.transforms import v2

log = logging.getLogger(__name__)

PairTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

# Named lists of steps; `dataset.augment` is one of these names or a list of steps.
PRESETS: dict[str, list[Any]] = {
    "none": [],
    "light": ["hflip", {"scale": [0.75, 1.25]}],
    "strong": ["hflip", "vflip", {"scale": [0.5, 1.5]}, {"rotate": 15}, {"color_jitter": 0.3}],
}
STEPS = ("hflip", "vflip", "scale", "rotate", "color_jitter")
SIZE_MODES = ("crop", "resize")


def _step(name: str, arg: Any, fill: dict[type, int]) -> v2.Transform:
    """One v2 transform from a step name and its argument (``None``: the default)."""
    from torchvision.transforms import v2

    if name == "hflip":
        return v2.RandomHorizontalFlip(0.5 if arg is None else float(arg))
    if name == "vflip":
        return v2.RandomVerticalFlip(0.5 if arg is None else float(arg))
    if name == "scale":
        low, high = arg if arg is not None else (0.75, 1.25)
        # RandomAffine keeps the canvas: zoomed-out borders get the fill (ignore index for masks).
        return v2.RandomAffine(degrees=0, scale=(float(low), float(high)), fill=fill)
    if name == "rotate":
        return v2.RandomAffine(degrees=15.0 if arg is None else float(arg), fill=fill)
    if name == "color_jitter":
        # v2 applies photometric transforms to tv_tensors.Image only: masks pass through unchanged.
        if isinstance(arg, Mapping):
            return v2.ColorJitter(**arg)
        strength = 0.3 if arg is None else float(arg)
        return v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength, hue=min(strength / 6, 0.5))
    raise ConfigError(f"dataset.augment: unknown step {name!r}; known steps: {', '.join(STEPS)}; presets: {', '.join(PRESETS)}")


def parse_steps(augment: str | Sequence[Any] | None) -> list[tuple[str, Any]]:
    """``dataset.augment`` as ``(step, argument)`` pairs: a preset name, or a list of
    step names and one-key mappings ``{step: argument}``."""
    if augment is None:
        augment = "none"
    if isinstance(augment, str):
        if augment not in PRESETS:
            raise ConfigError(
                f"dataset.augment={augment}: unknown preset; presets: {', '.join(PRESETS)}, or a list of steps ({', '.join(STEPS)})"
            )
        augment = PRESETS[augment]
    steps = []
    for entry in augment:
        if isinstance(entry, str):
            steps.append((entry, None))
        elif isinstance(entry, Mapping) and len(entry) == 1:
            steps.append(next(iter(entry.items())))
        else:
            raise ConfigError(f"dataset.augment: entry {entry!r} must be a step name or {{step: argument}}, e.g. {{scale: [0.5, 2.0]}}")
        if steps[-1][0] not in STEPS:
            raise ConfigError(f"dataset.augment: unknown step {steps[-1][0]!r}; known steps: {', '.join(STEPS)}")
    return steps


def build_transform(
    train: bool,
    size: int | Sequence[int] | None,
    augment: str | Sequence[Any] | None,
    ignore_index: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    dims: int = 2,
    size_mode: str = "crop",
) -> PairTransform:
    """The paired transform of one split: training crops (``size_mode=crop``) or resizes
    (``resize``) to ``size`` and augments; validation converts and normalises, and with
    ``resize`` resizes to ``size`` too."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    if size_mode not in SIZE_MODES:
        raise ConfigError(f"dataset.size_mode={size_mode}: use crop (random crops at full resolution) or resize (whole images scaled to dataset.size)")
    if size_mode == "resize" and (dims == 3 or size is None):
        raise ConfigError("dataset.size_mode=resize needs 2D images and a dataset.size; volumes are cropped (dataset.size_mode=crop)")
    steps = parse_steps(augment) if train else []
    if dims == 3:
        return VolumeTransform(size if train else None, [name for name, _ in steps], ignore_index, mean, std)
    # Padded or zoomed-out mask pixels get the ignore index, so the loss leaves them out.
    # Without an ignore index they can only become class 0: say so once.
    mask_fill = 0 if ignore_index is None else int(ignore_index)
    if train and ignore_index is None and any(name in ("scale", "rotate") for name, _ in steps):
        log.info("dataset.ignore_index=null: padded / rotated-in mask pixels are labelled class 0 (set an ignore index to leave them out)")
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: mask_fill}
    pipeline: list[v2.Transform] = [
        # Integer images (8 or 16 bit) to [0, 1] floats; masks stay int64 class indices.
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
    ]
    if size_mode == "resize":
        # Whole images to exactly dataset.size, in both splits: masks are resized with nearest by v2.
        pipeline.append(v2.Resize(_pair(size), antialias=True))
    elif train and size is not None:
        pipeline.append(v2.RandomCrop(_pair(size), pad_if_needed=True, fill=fill))
    pipeline += [_step(name, arg, fill) for name, arg in steps]
    if mean is not None:
        pipeline.append(v2.Normalize(list(mean), list(std if std is not None else [1.0] * len(mean))))
    compose = v2.Compose(pipeline)

    def transform(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out_image, out_mask = compose(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return out_image.as_subclass(Tensor), out_mask.as_subclass(Tensor)

    return transform


def _pair(size: int | Sequence[int]) -> list[int]:
    return [int(size)] * 2 if isinstance(size, int) else [int(s) for s in size]


class VolumeTransform:
    """Volumes ``(C, D, H, W)`` with masks ``(D, H, W)``: random crop to ``size`` (padding
    the image with 0 and the mask with the ignore index), flips, scaling to [0, 1] for
    integer volumes, normalisation. Only ``hflip`` and ``vflip`` steps apply (to W and H),
    plus a flip of D with either."""

    def __init__(
        self, size: int | Sequence[int] | None, steps: list[str], ignore_index: int | None,
        mean: Sequence[float] | None, std: Sequence[float] | None,
    ) -> None:
        unsupported = sorted(set(steps) - {"hflip", "vflip"})
        if unsupported:
            raise ConfigError(f"dataset.augment: {', '.join(unsupported)} not available for 3D volumes; use hflip / vflip or none")
        self.size = None if size is None else ([int(size)] * 3 if isinstance(size, int) else [int(s) for s in size])
        self.flip_axes = [axis for axis, step in ((-1, "hflip"), (-2, "vflip")) if step in steps]
        if self.flip_axes:
            self.flip_axes.append(-3)
        self.mask_fill = 0 if ignore_index is None else int(ignore_index)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if not image.is_floating_point():
            image = image.float() / torch.iinfo(image.dtype).max
        image, mask = image.float(), mask.long()
        if self.size is not None:
            image, mask = self._crop(image, mask)
        for axis in self.flip_axes:
            if torch.rand(()) < 0.5:
                image, mask = image.flip(axis), mask.flip(axis)
        if self.mean is not None:
            image = (image - self.mean) / (self.std if self.std is not None else 1.0)
        return image, mask

    def _crop(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        shape = mask.shape
        pad = [max(0, want - have) for want, have in zip(self.size, shape)]
        if any(pad):
            # F.pad takes (last axis first) pairs: pad at the end of each axis.
            widths = [value for p in reversed(pad) for value in (0, p)]
            image = torch.nn.functional.pad(image, widths, value=0.0)
            mask = torch.nn.functional.pad(mask, widths, value=self.mask_fill)
        starts = [int(torch.randint(0, have - want + 1, ())) for want, have in zip(self.size, mask.shape)]
        window = tuple(slice(start, start + want) for start, want in zip(starts, self.size))
        return image[(slice(None), *window)], mask[window]
