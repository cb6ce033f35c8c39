"""The README's TensorBoard pictures, from the event files of a real run: ``python docs/make_pictures.py RUN_DIR``.

Writes ``docs/tensorboard_predictions.png`` and ``docs/tensorboard_confusion.png``
(the last validation's pictures, straight from the event file) and
``docs/tensorboard_curves.png`` (the loss and IoU curves, drawn with PIL from the
logged scalars, as TensorBoard's Scalars tab shows them).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segtrain.visualize import default_palette, font, text_width

DOCS = Path(__file__).resolve().parent
Series = tuple[list[int], list[float], tuple[int, int, int]]


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's default exponential moving average (smoothing 0.6), debiased."""
    smoothed, last, count = [], 0.0, 0
    for value in values:
        count += 1
        last = last * weight + (1 - weight) * value
        smoothed.append(last / (1 - weight**count))
    return smoothed


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = (high - low) or 1.0
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(factor for factor in (1, 2, 2.5, 5, 10) if step * factor >= raw)
    return [step * i for i in range(math.ceil(low / step), math.floor(high / step) + 1)]


def chart(title: str, series: dict[str, Series], width: int = 520, height: int = 340) -> Image.Image:
    """Lines over the global step, with axes, ticks and a legend."""
    left, right, top, bottom = 52, 12, 26, 58
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 6), title, fill=(0, 0, 0), font=font())
    steps = [step for xs, _, _ in series.values() for step in xs]
    values = [value for _, ys, _ in series.values() for value in ys]
    x_low, x_high = 0, max(steps)
    y_low, y_high = min(0.0, min(values)), max(values) * 1.05
    plot_w, plot_h = width - left - right, height - top - bottom

    def point(step: float, value: float) -> tuple[float, float]:
        return left + plot_w * (step - x_low) / (x_high - x_low), top + plot_h * (1 - (value - y_low) / (y_high - y_low))

    for tick in nice_ticks(y_low, y_high):
        _, y = point(x_low, tick)
        draw.line([left, y, width - right, y], fill=(230, 230, 230))
        label = f"{tick:g}"
        draw.text((left - 6 - text_width(label), y - 7), label, fill=(80, 80, 80), font=font())
    for tick in nice_ticks(x_low, x_high, 6):
        x, _ = point(tick, y_low)
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill=(80, 80, 80))
        label = f"{tick:g}"
        draw.text((x - text_width(label) / 2, top + plot_h + 6), label, fill=(80, 80, 80), font=font())
    draw.text((left + plot_w / 2 - text_width("step") / 2, top + plot_h + 20), "step", fill=(80, 80, 80), font=font())
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(120, 120, 120))
    for xs, ys, colour in series.values():
        points = [point(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if len(points) < 30:  # sparse series (validation): mark each point
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    x = left
    for name, (_, _, colour) in series.items():
        draw.rectangle([x, height - 18, x + 12, height - 6], fill=colour)
        draw.text((x + 16, height - 21), name, fill=(0, 0, 0), font=font())
        x += 16 + text_width(name) + 14
    return canvas


def main(run_dir: Path) -> None:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    for tag, name in (("val/predictions", "tensorboard_predictions.png"), ("val/confusion_matrix", "tensorboard_confusion.png")):
        (DOCS / name).write_bytes(accumulator.Images(tag)[-1].encoded_image_string)  # the PNG as logged

    def scalars(tag: str) -> tuple[list[int], list[float]]:
        events = accumulator.Scalars(tag)
        return [event.step for event in events], [event.value for event in events]

    train_steps, train_loss = scalars("train/loss")
    losses = chart("loss", {
        "train/loss (smoothed 0.6)": (train_steps, smooth(train_loss), (31, 119, 180)),
        "val/loss": (*scalars("val/loss"), (255, 127, 14)),
    })
    iou_tags = sorted(tag for tag in accumulator.Tags()["scalars"] if tag.startswith("val/IoU/"))
    palette = default_palette(len(iou_tags) + 1)
    ious = chart("val/mIoU and val/IoU/<class>", {
        "mIoU": (*scalars("val/mIoU"), (0, 0, 0)),
        **{tag.removeprefix("val/IoU/"): (*scalars(tag), tuple(int(c) for c in palette[i + 1])) for i, tag in enumerate(t for t in iou_tags if not t.endswith("/background"))},
    })
    curves = Image.new("RGB", (losses.width + ious.width, max(losses.height, ious.height)), (255, 255, 255))
    curves.paste(losses, (0, 0))
    curves.paste(ious, (losses.width, 0))
    curves.save(DOCS / "tensorboard_curves.png", optimize=True)
    print("wrote", *(DOCS / name for name in ("tensorboard_predictions.png", "tensorboard_confusion.png", "tensorboard_curves.png")))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
