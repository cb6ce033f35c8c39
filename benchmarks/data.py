"""Is the data loader the bottleneck? Images/s of the input pipelines next to the training step's.

    python benchmarks/data.py            # the table in benchmarks/README.md
    python benchmarks/data.py --smoke    # tiny sizes (CI)

Pipelines: ``dataset=folder`` with the ``light`` augmentation (PNG decoding, crop,
flip, scale) on a folder of generated 8-bit RGB images written to a temporary directory,
and the generated ``shapes`` dataset (its per-worker cache off, so every sample is drawn),
each through ``segtrain.build.build_loader`` with 0, 1 and 2 workers, timed over the
batches after the first (worker start-up excluded). The training step: forward,
backward and an AdamW step of the default UNet (``configs/model/unet.yaml``) on batches
of the same size, on CUDA if available, else the CPU.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from segtrain.build import build_loader
from segtrain.batches import MaskCheck
from segtrain.host_memory import keep_freed_memory
from segtrain.models.unet import UNet
from segtrain.registry import DATASETS


def write_folder(root: Path, count: int, size: int) -> None:
    """``count`` RGB images with a rectangle (class 1) and their 0/255 masks, as PNG."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for index in range(count):
        mask = np.zeros((size, size), dtype=np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        mask[top : top + size // 3, left : left + size // 3] = 255
        image = (rng.integers(0, 60, (size, size, 3)) + (mask[..., None] // 2)).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"{index}.png")


def loader_images_per_second(loader: DataLoader, batches: int) -> float:
    """Images/s over ``batches`` batches after the first (epochs repeat as needed)."""
    seen, start = 0, None
    while True:
        for images, _ in loader:
            if start is None:  # the first batch pays for worker start-up
                start = time.perf_counter()
                continue
            seen += images.shape[0]
            batches -= 1
            if batches == 0:
                return seen / (time.perf_counter() - start)


def train_step_images_per_second(batch_size: int, crop: int, steps: int, device: torch.device) -> float:
    model = UNet(3, 2, width=16, depth=3).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    images = torch.randn(batch_size, 3, crop, crop, device=device)
    masks = torch.randint(0, 2, (batch_size, crop, crop), device=device)
    for index in range(steps + 1):
        if index == 1:  # after one warm-up step
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few batches (CI)")
    args = parser.parse_args()
    count, size, crop, batch_size, batches, steps = (12, 64, 32, 4, 3, 2) if args.smoke else (64, 512, 256, 8, 24, 5)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as a CPU training run does (trainer.keep_freed_memory); forked workers inherit it
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        write_folder(Path(folder), count, size)
        folder_set = DATASETS.get("folder")(
            "train", root=folder, train_images="images", train_masks="masks", num_classes=2,
            mask_values=[0, 255], size=crop, augment="light", val_fraction=0.1,
        )
        shapes_set = DATASETS.get("shapes")("train", size=crop, train_samples=count, cache=False)
        for name, dataset, classes in ((f"folder+light ({size}px PNG -> {crop})", folder_set, 2), (f"shapes ({crop}px)", shapes_set, 4)):
            for workers in (0, 1, 2):
                # As in training: the collate checks each batch's mask values.
                loader = build_loader(dataset, batch_size, workers, True, 0, device, MaskCheck(name, "train", classes, None))
                rows.append((name, str(workers), loader_images_per_second(loader, batches)))
                del loader  # ends persistent workers before the next measurement
    rows.append((f"train step, UNet 16x3 ({device.type})", "-", train_step_images_per_second(batch_size, crop, steps, device)))
    print(f"batch size {batch_size}, torch threads {torch.get_num_threads()}\n")
    print("| pipeline | workers | images/s |\n|---|---|---|")
    for name, workers, speed in rows:
        print(f"| {name} | {workers} | {speed:.1f} |")


if __name__ == "__main__":
    main()
