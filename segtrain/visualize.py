"""Pictures for TensorBoard: class palettes, prediction panels and the confusion-matrix heatmap.

Everything here takes and returns numpy arrays (``uint8`` RGB images ``(H, W, 3)``) and
draws on the CPU with PIL and ``torchvision.utils.make_grid``, so it runs on any machine
and costs little: it is called at validation only, on a handful of fixed samples.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from segtrain.errors import ConfigError

# Background black, then bright, easily told apart colours (matplotlib's tab10 and tab20's
# light half); classes beyond these get the PASCAL VOC bit-pattern colours.
_BASE_PALETTE = [
    (0, 0, 0),
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
]
# Pixels whose target is the ignore index (or any value outside the classes).
IGNORED_COLOUR = (255, 255, 255)
COLUMNS = ("input", "ground truth", "prediction", "overlay")
OVERLAY_ALPHA = 0.5
GAP, HEADER = 4, 18  # pixels between tiles; height of the column titles


def voc_colour(index: int) -> tuple[int, int, int]:
    """The PASCAL VOC palette colour of ``index``: its bits spread over the high bits of R, G and B."""
    red = green = blue = 0
    for bit in range(8):
        red |= ((index >> 0) & 1) << (7 - bit)
        green |= ((index >> 1) & 1) << (7 - bit)
        blue |= ((index >> 2) & 1) << (7 - bit)
        index >>= 3
    return red, green, blue


def default_palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours: class 0 black, then ``_BASE_PALETTE``, then VOC colours."""
    colours = [_BASE_PALETTE[i] if i < len(_BASE_PALETTE) else voc_colour(i) for i in range(num_classes)]
    return np.asarray(colours, dtype=np.uint8)


def resolve_palette(configured: Sequence[Sequence[int]] | None, dataset: object, num_classes: int) -> np.ndarray:
    """The run's palette: ``dataset.palette`` from the config, else the dataset's own ``palette``, else the default."""
    colours = configured if configured is not None else getattr(dataset, "palette", None)
    if colours is None:
        return default_palette(num_classes)
    palette = np.asarray(colours)
    if palette.shape != (num_classes, 3) or palette.min() < 0 or palette.max() > 255:
        raise ConfigError(
            f"dataset.palette={np.asarray(colours).tolist()}: needs one [r, g, b] (0..255) per class, "
            f"{num_classes} in all (dataset.num_classes={num_classes}); or null for the default palette"
        )
    return palette.astype(np.uint8)


def colourize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``(H, W)`` class indices to ``(H, W, 3)`` colours; the ignore index and any other value outside the classes turn white."""
    lookup = np.concatenate([palette, np.asarray([IGNORED_COLOUR], dtype=np.uint8)])
    mask = np.asarray(mask).astype(np.int64)
    index = np.where((mask >= 0) & (mask < len(palette)), mask, len(palette))
    return lookup[index]


def to_rgb(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` float image (any range, e.g. normalised) to ``(H, W, 3)`` uint8, min-max scaled per image."""
    image = np.asarray(image, dtype=np.float32)
    image = image[:3] if image.shape[0] >= 3 else image[:1].repeat(3, 0)
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return (scaled.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)


def overlay(image_rgb: np.ndarray, mask_rgb: np.ndarray) -> np.ndarray:
    """The mask colours blended over the image, except where the colour is black (background stays visible)."""
    blended = (1 - OVERLAY_ALPHA) * image_rgb + OVERLAY_ALPHA * mask_rgb.astype(np.float32)
    coloured = mask_rgb.any(axis=-1, keepdims=True)
    return np.where(coloured, blended + 0.5, image_rgb).astype(np.uint8)


def middle_slices(image: np.ndarray, mask: np.ndarray, prediction: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """2D: the sample itself; 3D ``(C, D, H, W)``: the middle slice across each of the three axes."""
    if mask.ndim == 2:
        return [("", image, mask, prediction)]
    views = []
    for axis in range(3):
        middle = mask.shape[axis] // 2
        views.append((f"axis {axis}", image.take(middle, axis + 1), mask.take(middle, axis), prediction.take(middle, axis)))
    return views


def fit_tile(array: np.ndarray, tile_size: int, smooth: bool) -> np.ndarray:
    """The ``(H, W, 3)`` picture at the top left of a white ``tile_size`` square: shrunk so the longer
    side is ``tile_size`` when larger, grown by a whole factor (nearest) when much smaller."""
    height, width = array.shape[:2]
    longer = max(height, width)
    if longer > tile_size:
        size = (max(1, round(width * tile_size / longer)), max(1, round(height * tile_size / longer)))
        resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST  # masks keep exact class colours
        array = np.asarray(Image.fromarray(array).resize(size, resample))
    else:
        factor = max(1, tile_size // longer)  # whole factors keep every sample pixel a square block
        array = array.repeat(factor, 0).repeat(factor, 1)
    # make_grid takes tiles of one size, and samples may differ: white below and to the right.
    return np.pad(array, ((0, tile_size - array.shape[0]), (0, tile_size - array.shape[1]), (0, 0)), constant_values=255)


@lru_cache(maxsize=1)
def font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=12)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def text_width(text: str) -> int:
    left, _, right, _ = font().getbbox(text)
    return int(right - left)


def legend(class_names: Sequence[str], palette: np.ndarray, width: int) -> Image.Image:
    """Colour swatches with class names, wrapped onto as many rows as ``width`` needs."""
    row_height, swatch, gap = 18, 12, 12
    entries = [(name, tuple(int(v) for v in colour)) for name, colour in zip(class_names, palette)]
    rows: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, colour in entries:
        needed = swatch + 4 + text_width(name) + gap
        if rows[-1] and used + needed > width:
            rows.append([])
            used = 0
        rows[-1].append((name, colour))
        used += needed
    canvas = Image.new("RGB", (width, row_height * len(rows) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row_index, row in enumerate(rows):
        x, y = 4, 2 + row_index * row_height
        for name, colour in row:
            draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=colour, outline=(0, 0, 0))
            draw.text((x + swatch + 4, y), name, fill=(0, 0, 0), font=font())
            x += swatch + 4 + text_width(name) + gap
    return canvas


def prediction_panel(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    class_names: Sequence[str],
    palette: np.ndarray,
    tile_size: int = 128,
) -> np.ndarray:
    """One picture of fixed validation samples: a row per sample (per axis in 3D) of input | ground truth | prediction | overlay.

    Each image is ``(C, *spatial)``, each mask and prediction ``(*spatial)``; samples may
    differ in size. Every tile sits in a ``tile_size`` square cell (top left). Column
    titles on top, sample labels on the left, a legend of class colours below.
    """
    labels, tiles = [], []
    for index, (image, mask, prediction) in enumerate(zip(images, masks, predictions)):
        for view, view_image, view_mask, view_prediction in middle_slices(image, mask, prediction):
            rgb = to_rgb(view_image)
            predicted = colourize(view_prediction, palette)
            labels.append(f"#{index} {view}".strip())
            tiles += [
                fit_tile(rgb, tile_size, smooth=True),
                fit_tile(colourize(view_mask, palette), tile_size, smooth=False),
                fit_tile(predicted, tile_size, smooth=False),
                fit_tile(overlay(rgb, predicted), tile_size, smooth=True),
            ]
    # make_grid puts GAP between the tiles and around them: its corner sits GAP above and left of the first tile.
    grid = make_grid(torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2), nrow=len(COLUMNS), padding=GAP, pad_value=255)
    tile_shape = (tile_size, tile_size)
    top, left, _, _ = tile_box(0, 0, tile_shape, labels)
    width, grid_height = left - GAP + grid.shape[2], top - GAP + grid.shape[1]
    key = legend(class_names, palette, width)
    canvas = Image.new("RGB", (width, grid_height + key.height), (255, 255, 255))
    canvas.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (left - GAP, top - GAP))
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(COLUMNS):
        _, left, _, right = tile_box(0, column, tile_shape, labels)
        draw.text(((left + right - text_width(title)) // 2, 2), title, fill=(0, 0, 0), font=font())
    for row, label in enumerate(labels):
        top, _, bottom, _ = tile_box(row, 0, tile_shape, labels)
        draw.text((GAP, (top + bottom) // 2 - 7), label, fill=(0, 0, 0), font=font())
    canvas.paste(key, (0, grid_height))
    return np.asarray(canvas)


def tile_box(row: int, column: int, tile_shape: tuple[int, ...], labels: Sequence[str]) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` of one tile of a :func:`prediction_panel` with these row labels."""
    height, width = tile_shape[:2]
    label_width = max(text_width(label) for label in labels) + 2 * GAP
    top, left = HEADER + row * (height + GAP), label_width + column * (width + GAP)
    return top, left, top + height, left + width


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row (true class) divided by its pixel count: the diagonal is the per-class recall; empty rows stay 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def confusion_heatmap(matrix: np.ndarray | torch.Tensor, class_names: Sequence[str], max_size: int = 480) -> np.ndarray:
    """The confusion matrix ``[true, predicted]`` as a row-normalised heatmap (white 0 to dark blue 1) with class names."""
    fractions = normalise_rows(np.asarray(matrix))
    count = len(class_names)
    cell = int(np.clip(max_size // max(count, 1), 6, 48))
    show_names, show_values = cell >= 12, cell >= 30
    names = [name if len(name) <= 18 else name[:17] + "…" for name in class_names]
    margin = (max(text_width(name) for name in names) + 8) if show_names else 8
    title = "confusion matrix: rows true class (normalised), columns predicted"
    title_height = 18
    width = max(margin + count * cell + 8, text_width(title) + 8)
    canvas = Image.new("RGB", (width, title_height + margin + count * cell + 8), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=(0, 0, 0), font=font())
    top = title_height + margin
    dark = np.array([8, 48, 107], dtype=np.float64)
    for row in range(count):
        for column in range(count):
            value = fractions[row, column]
            colour = tuple(int(c) for c in np.round(255 - value * (255 - dark)))
            x, y = margin + column * cell, top + row * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
            if show_values:
                text = f"{value:.2f}"
                draw.text((x + (cell - text_width(text)) // 2, y + cell // 2 - 7), text, fill=(255, 255, 255) if value > 0.5 else (0, 0, 0), font=font())
    if show_names:
        for index, name in enumerate(names):
            draw.text((margin - text_width(name) - 4, top + index * cell + cell // 2 - 7), name, fill=(0, 0, 0), font=font())
            # Column names run upwards: drawn on their own strip, then rotated.
            strip = Image.new("RGB", (margin, cell), (255, 255, 255))
            ImageDraw.Draw(strip).text((4, cell // 2 - 7), name, fill=(0, 0, 0), font=font())
            canvas.paste(strip.rotate(90, expand=True), (margin + index * cell, title_height))
    return np.asarray(canvas)


def fixed_samples(dataset: torch.utils.data.Dataset, count: int) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]] | None:
    """``count`` validation samples spread evenly over the split: the same ones at every validation.

    Returns their indices, images ``(C, *spatial)`` and masks ``(*spatial)`` (kept apart: sizes
    may differ between samples); None when ``count`` is 0.
    """
    count = min(count, len(dataset))
    if count <= 0:
        return None
    indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, count).round()})
    pairs = [dataset[index] for index in indices]
    return indices, [torch.as_tensor(image) for image, _ in pairs], [torch.as_tensor(mask) for _, mask in pairs]
