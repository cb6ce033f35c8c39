"""``mode=predict``: index masks and colour overlays for a folder of images."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segtrain.build import Components
from segtrain.datasets.folder import IMAGE_EXTENSIONS, read_image
from segtrain.errors import ConfigError
from segtrain.inference import SlidingWindow, segment_logits
from segtrain.task import classes_from_logits
from segtrain.visualize import colourize, overlay, to_rgb

log = logging.getLogger(__name__)


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"predict.input={folder}: not a folder; give a folder of {', '.join(IMAGE_EXTENSIONS)} images")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"predict.input={folder}: no {', '.join(IMAGE_EXTENSIONS)} images in it")
    return files


def preprocess(image: np.ndarray, in_channels: int, dataset: object) -> torch.Tensor:
    """An image as the model saw it in validation: the channels of the data, then the
    validation split's own transform (scaling and normalisation) where the dataset has one."""
    if image.shape[0] != in_channels:
        if image.shape[0] == 1:
            image = np.repeat(image, in_channels, axis=0)
        elif in_channels == 1:
            image = image[:3].astype(np.float32).mean(0, keepdims=True).astype(image.dtype)
        else:
            raise ConfigError(f"an image with {image.shape[0]} channels, but the model takes dataset.in_channels={in_channels}")
    tensor = torch.from_numpy(np.ascontiguousarray(image))
    transform = getattr(dataset, "transform", None)
    if transform is not None:
        return transform(tensor, torch.zeros(tensor.shape[1:], dtype=torch.int64))[0]
    # Datasets without a transform (shapes) produce [0, 1] floats.
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255
    if tensor.dtype in (torch.int16, torch.int32) or image.dtype == np.uint16:
        return tensor.float() / 65535
    return tensor.float()


@torch.no_grad()
def predict_folder(
    components: Components, input_dir: Path, output_dir: Path, batch_size: int, sliding_window: SlidingWindow | None, palette: np.ndarray
) -> list[Path]:
    """Write ``<stem>.png`` (class indices, the input's size) and ``<stem>_overlay.png`` per image."""
    model, device = components.model.eval(), components.device
    in_channels = next(p for p in model.parameters() if p.dim() > 1).shape[1]
    dataset = components.val_loader.dataset
    output_dir.mkdir(parents=True, exist_ok=True)
    files = image_files(input_dir)
    written = []
    # Batches of consecutive images of one size (whole images of different sizes do not stack).
    batch: list[tuple[Path, np.ndarray, torch.Tensor]] = []
    for index, path in enumerate(files):
        raw = read_image(path)
        batch.append((path, raw, preprocess(raw, in_channels, dataset)))
        following = files[index + 1] if index + 1 < len(files) else None
        full = len(batch) == batch_size or following is None
        if not full and following is not None and read_image_shape(following) == batch[0][1].shape[1:]:
            continue
        images = torch.stack([tensor for _, _, tensor in batch]).to(device)
        logits = segment_logits(model, images, sliding_window)
        if logits.shape[2:] != batch[0][1].shape[1:]:  # dataset.size_mode=resize: back to the images' own size
            logits = torch.nn.functional.interpolate(logits, size=batch[0][1].shape[1:], mode="bilinear", align_corners=False)
        for (file, raw_image, _), classes in zip(batch, classes_from_logits(logits).cpu().numpy()):
            written += write_prediction(file, raw_image, classes, output_dir, palette)
        batch = []
    log.info("predicted %d images into %s", len(files), output_dir)
    return written


def read_image_shape(path: Path) -> tuple[int, ...]:
    with Image.open(path) as image:
        return (image.height, image.width)


def write_prediction(path: Path, raw_image: np.ndarray, classes: np.ndarray, output_dir: Path, palette: np.ndarray) -> list[Path]:
    mask_path, overlay_path = output_dir / f"{path.stem}.png", output_dir / f"{path.stem}_overlay.png"
    if len(palette) <= 256:
        # A palette ("P") PNG, the VOC convention: the pixel values stay the class indices, and a
        # viewer shows the dataset's colours.
        mask = Image.fromarray(classes.astype(np.uint8), mode="P")
        mask.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
        mask.save(mask_path)
    else:  # more classes than a palette holds: plain 16-bit indices
        Image.fromarray(classes.astype(np.uint16)).save(mask_path)
    image_rgb = to_rgb(raw_image.astype(np.float32))
    Image.fromarray(overlay(image_rgb, colourize(classes, palette))).save(overlay_path)
    return [mask_path, overlay_path]

