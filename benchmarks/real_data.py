"""segtrain's defaults against a plain PyTorch loop on real-sized data, under one wall-clock budget.

    python benchmarks/real_data.py --budget 300                 # both datasets, the table in benchmarks/README.md
    python benchmarks/real_data.py --dataset folder --budget 120 --repeats 3     # seeds 0, 1, 2: the spread
    python benchmarks/real_data.py --dataset folder optimizer.lr=0.002   # segtrain side with config overrides
    python benchmarks/real_data.py --smoke                      # tiny sizes and budget (CI keeps it working)

Data: ``isbi`` is the 30 ISBI 2012 EM slices in ``../shared/datasets/isbi2012-membrane``
(``dataset=isbi``, 24 train / 6 val by the seed); ``folder`` is generated into a temporary
folder in the documented layout (``train/images``, ``train/masks``, ``val/images``,
``val/masks``): 123 training and 51 validation RGB street-like scenes of 360x480 pixels,
11 textured classes and a void label 255 (``dataset.ignore_index=255``); nothing is kept.

The two sides run at the same time, each pinned to its own core (``taskset -c 0`` and
``-c 1``, ``OMP_NUM_THREADS=1``, one torch thread), so both see the same machine load:

- **segtrain**: ``configs/train.yaml`` with only what a new user sets (folder: the folder
  contract plus ``dataset.size=[176,240] dataset.batch_size=8``; isbi: ``dataset=isbi``),
  built and trained as ``segtrain.run.train`` does (``build``, ``make_trainer``,
  ``Trainer.fit``: its DataLoader as configured (on the CPU ``num_workers=auto`` loads in the
  training process and ``cache=auto`` keeps this set decoded), checkpoints, TensorBoard and all), with
  ``trainer.max_time`` set to the budget less the time its build took (the data audit and
  ``auto`` mean/std: the plain loop's loading counts in its budget too) and
  ``trainer.max_epochs`` out of the way; the cosine schedule follows the time.
- **plain**: about 60 lines of PyTorch (``plain_worker``): whole images resized to the
  training size (masks nearest), per-channel mean/std of the training images, random
  horizontal flips, a depth-4 width-16 UNet (segtrain's ``UNet`` module: BatchNorm),
  AdamW 2e-3 without a schedule, cross-entropy, batch 8; it validates after every epoch
  and stops before an epoch that would not fit the budget.

mIoU comes from one confusion matrix over the validation split, void left out. Each side
validates as it trains: segtrain as configured (whole images at full size with
``size_mode=crop``, at ``dataset.size`` with ``size_mode=resize``); the plain loop at its
training size ("plain mIoU") and, for comparison with full-size validation, with its
logits upsampled to the full-size masks ("full-size"). Time split: data (waiting on the
loader), train (steps), val (validation, checkpoints and pictures), from the budget's
start (for segtrain: its build, with the audit, counts as data); Python and torch start-up are not counted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ISBI = REPO.parent / "shared" / "datasets" / "isbi2012-membrane"
GOAL_FALL = 0.03  # "a curve that does not fall back by more than a few points between validations"


# --------------------------------------------------------------------------- data
def street_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One RGB street-like scene (uint8 ``(H, W, 3)``) and its mask (classes 0..10, void 255).

    Layers: sky, building, road, sidewalk, lane marks, trees, poles, signs, cars, pedestrians,
    cyclists; colours overlap between classes and vary per image (lighting), textures and
    noise on top, so that both colour and context are needed.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    mask = np.zeros((height, width), np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.55))
    sidewalk = horizon + int((height - horizon) * rng.uniform(0.1, 0.3))
    mask[:horizon] = 0  # sky
    skyline = horizon - rng.integers(10, horizon // 2 + 10, size=width // 40 + 1).repeat(40)[:width]
    mask[yy < skyline[None, :].repeat(height, 0)] = 0
    mask[(yy >= skyline[None, :]) & (yy < horizon)] = 1  # buildings
    mask[(yy >= horizon) & (yy < sidewalk)] = 3  # sidewalk band under the buildings
    mask[yy >= sidewalk] = 2  # road
    lanes = (yy > sidewalk + 20) & (np.abs((xx - width / 2) - (yy - sidewalk) * rng.uniform(-0.8, 0.8)) < 4) & ((yy // 12) % 2 == 0)
    mask[lanes] = 4
    for _ in range(rng.integers(1, 4)):  # trees: blobs over buildings
        cy, cx, r = rng.uniform(horizon * 0.3, horizon), rng.uniform(0, width), rng.uniform(20, 60)
        mask[((yy - cy) ** 2 + (xx - cx) ** 2 * 0.7) < r**2] = 5
    for _ in range(rng.integers(1, 4)):  # poles and signs
        x = int(rng.uniform(5, width - 5))
        mask[int(horizon * 0.4):sidewalk + 10, x:x + 3] = 6
        sy = int(horizon * rng.uniform(0.4, 0.8))
        mask[sy:sy + 14, x - 7:x + 10] = 7
    for _ in range(rng.integers(1, 5)):  # cars on the road, larger when nearer
        y = rng.uniform(sidewalk, height - 10)
        scale = 0.3 + (y - horizon) / (height - horizon)
        h, w = int(40 * scale), int(90 * scale)
        x = int(rng.uniform(0, width - w))
        mask[int(y) - h:int(y), x:x + w] = 8
    for cls in (9, 10):  # pedestrians (on the sidewalk), cyclists (on the road)
        for _ in range(rng.integers(0, 3)):
            y = rng.uniform(horizon + 5, sidewalk + 5) if cls == 9 else rng.uniform(sidewalk + 10, height - 5)
            scale = 0.4 + (y - horizon) / (height - horizon)
            cx, h, w = rng.uniform(10, width - 10), 50 * scale, (8 if cls == 9 else 18) * scale
            mask[(np.abs(xx - cx) < w) & (yy > y - h) & (yy < y)] = cls
    # Colours: per-class base colour, shifted per image (lighting) and per pixel (texture, noise).
    base = np.array([
        [150, 170, 200], [120, 110, 100], [90, 90, 95], [140, 130, 120], [220, 220, 210], [60, 110, 50],
        [100, 100, 100], [200, 170, 60], [120, 50, 50], [150, 100, 90], [110, 80, 140],
    ], np.float32)
    base[8] = rng.uniform(40, 220, 3)  # cars come in any colour
    light = rng.uniform(0.6, 1.3)
    image = base[mask] * light
    texture = {1: np.sin(xx / 3) * np.sin(yy / 4) * 25, 5: rng.normal(0, 30, (height, width)), 2: rng.normal(0, 8, (height, width))}
    for cls, pattern in texture.items():
        image[mask == cls] += pattern[mask == cls, None]
    image += rng.normal(0, 14, image.shape) + (yy / height * 30 - 15)[..., None]
    # Void: a thin band at object edges and a few unlabelled blobs, as hand-drawn masks have.
    edges = np.zeros_like(mask, bool)
    edges[1:] |= mask[1:] != mask[:-1]
    edges[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    mask = mask.copy()
    mask[edges] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_folder(root: Path, train: int, val: int, height: int, width: int, seed: int = 0) -> None:
    """The street-like set in the folder layout (``train|val/images|masks``, PNG)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, mask = street_scene(rng, height, width)
            Image.fromarray(image).save(root / split / "images" / f"{index:04d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{index:04d}.png")


def dataset_spec(name: str, root: Path | None, smoke: bool) -> dict[str, Any]:
    """What each side needs to know about one dataset."""
    if name == "isbi":
        return {
            "name": "isbi", "overrides": ["dataset=isbi", f"dataset.root={ISBI}"], "root": str(ISBI), "split": "fraction",
            "num_classes": 2, "mask_values": [0, 255], "ignore_index": None, "plain_size": [128, 128] if smoke else [256, 256],
        }
    size = [48, 64] if smoke else [176, 240]
    return {
        "name": "folder",
        "overrides": [
            "dataset=folder", f"dataset.root={root}", "dataset.train_images=train/images", "dataset.train_masks=train/masks",
            "dataset.val_images=val/images", "dataset.val_masks=val/masks", "dataset.num_classes=11", "dataset.ignore_index=255",
            f"dataset.size=[{size[0]},{size[1]}]", "dataset.batch_size=8",
        ],
        "root": str(root), "split": "folders", "num_classes": 11, "mask_values": None, "ignore_index": 255, "plain_size": size,
    }


# --------------------------------------------------------------------------- the plain loop
def load_pairs(spec: dict[str, Any]) -> tuple[list, list]:
    """The same (image, mask) file pairs segtrain trains and validates on."""
    sys.path.insert(0, str(REPO))
    from segtrain.datasets.folder import pair_by_stem, split_off

    root = Path(spec["root"])
    if spec["split"] == "fraction":
        return split_off(pair_by_stem(root / "images", root / "masks", "train").pairs, 0.2, 0)
    return pair_by_stem(root / "train/images", root / "train/masks", "train").pairs, pair_by_stem(root / "val/images", root / "val/masks", "val").pairs


def plain_worker(spec: dict[str, Any], budget: float, out: Path, seed: int = 0) -> None:
    """A plain PyTorch loop: resize, normalise, flip, UNet 16x4, AdamW 2e-3; validate every epoch."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from segtrain.models.unet import UNet

    torch.set_num_threads(1)
    torch.manual_seed(seed)  # the weights and the data order; the split is the same for every seed
    size, classes, ignore = spec["plain_size"], spec["num_classes"], spec["ignore_index"]
    ignore = -100 if ignore is None else ignore

    def load(pairs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, masks = [], []
        for image_path, mask_path in pairs:
            images.append(torch.from_numpy(np.array(Image.open(image_path), np.float32) / 255))
            mask = np.array(Image.open(mask_path)).astype(np.int64)
            masks.append(torch.from_numpy(mask // 255 if spec["mask_values"] == [0, 255] else mask))
        image = torch.stack(images)
        image = image[:, None] if image.dim() == 3 else image.permute(0, 3, 1, 2)
        full = torch.stack(masks)
        small_image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
        small_mask = F.interpolate(full[:, None].float(), size=size, mode="nearest")[:, 0].long()
        return small_image, small_mask, full

    train_pairs, val_pairs = load_pairs(spec)
    start = time.perf_counter()
    train_x, train_y, _ = load(train_pairs)
    val_x, val_y, val_full = load(val_pairs)
    mean, std = train_x.mean((0, 2, 3), keepdim=True), train_x.std((0, 2, 3), keepdim=True)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    model = UNet(train_x.shape[1], classes, width=16, depth=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    timing = {"data": time.perf_counter() - start, "train": 0.0, "val": 0.0}
    history, steps, epoch, epoch_cost = [], 0, 0, 0.0
    while time.perf_counter() - start + epoch_cost < budget:
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x))
        for first in range(0, len(order) - 7, 8):
            tick = time.perf_counter()
            index = order[first:first + 8]
            x, y = train_x[index].clone(), train_y[index].clone()
            flip = torch.rand(len(index)) < 0.5
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            tock = time.perf_counter()
            loss = F.cross_entropy(model(x), y, ignore_index=ignore)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            timing["data"] += tock - tick
            timing["train"] += time.perf_counter() - tock
        tick = time.perf_counter()
        (miou, iou), (miou_full, _) = plain_validate(model, val_x, val_y, val_full, classes, ignore)
        timing["val"] += time.perf_counter() - tick
        epoch += 1
        history.append({"epoch": epoch, "step": steps, "seconds": time.perf_counter() - start, "mIoU": miou, "full_mIoU": miou_full, "IoU": iou})
        epoch_cost = time.perf_counter() - epoch_start
    out.write_text(json.dumps({"history": history, "steps": steps, "epochs": epoch, "time": timing, "seconds": time.perf_counter() - start}))


def plain_validate(model: Any, images: Any, masks: Any, full_masks: Any, classes: int, ignore: int) -> tuple[tuple[float, list], tuple[float, list]]:
    """(mIoU, per-class IoU) at the training size and with logits upsampled to the full-size masks."""
    import torch
    import torch.nn.functional as F

    model.eval()
    small, full = torch.zeros(classes, classes, dtype=torch.int64), torch.zeros(classes, classes, dtype=torch.int64)
    with torch.no_grad():
        for first in range(0, len(images), 8):
            logits = model(images[first:first + 8])
            for matrix, target, out in ((small, masks[first:first + 8], logits), (full, full_masks[first:first + 8], None)):
                if out is None:
                    out = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
                keep = target != ignore
                matrix += torch.bincount(target[keep] * classes + out.argmax(1)[keep], minlength=classes**2).view(classes, classes)
    return miou_of(small), miou_of(full)


def miou_of(matrix: Any) -> tuple[float, list]:
    """mIoU over the classes present in the labels, and each class's IoU (None where absent)."""
    iou = matrix.diag() / (matrix.sum(0) + matrix.sum(1) - matrix.diag()).clamp(min=1)
    present = matrix.sum(1) > 0
    return float(iou[present].mean()), [float(value) if here else None for value, here in zip(iou, present)]


# --------------------------------------------------------------------------- segtrain
def segtrain_worker(spec: dict[str, Any], budget: float, out: Path, overrides: list[str], seed: int = 0) -> None:
    """segtrain's defaults as ``segtrain.run.train`` runs them, under ``trainer.max_time``."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from omegaconf import OmegaConf

    from common import DataWaitTimer, compose_config
    from segtrain.build import build
    from segtrain.host_memory import keep_freed_memory_for_cpu_training
    from segtrain.run import make_trainer
    from segtrain.run_log import RunLog

    torch.set_num_threads(1)
    cfg = compose_config([
        *spec["overrides"], "device_list=[]", "trainer.progress_bar=false", "trainer.max_epochs=1000000", f"trainer.max_time={budget}",
        f"seed={seed}", "dataset.seed=0", *overrides,  # the seed changes the weights and the data order, not ISBI's split
    ])
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        components, run_cfg = build(cfg)
        components.time_budget.seconds = max(1.0, budget - (time.perf_counter() - start))  # the build's time counts, like the plain loop's loading
        keep_freed_memory_for_cpu_training(components.device.type, bool(cfg.trainer.keep_freed_memory))
        (Path(run_dir) / "config_resolved.yaml").write_text(OmegaConf.to_yaml(run_cfg, resolve=True))
        run_log = RunLog(Path(run_dir), components.class_names, None, cfg.trainer.log_image_size)
        trainer = make_trainer(cfg, components, run_cfg, Path(run_dir), run_log)
        timer = DataWaitTimer(trainer.train_loader)
        trainer.train_loader = timer  # type: ignore[assignment]
        history: list[dict[str, Any]] = []
        val_seconds = [0.0]
        validate = trainer.validate

        def timed_validate(epoch: int, **kwargs: Any) -> dict[str, Any] | None:
            tick = time.perf_counter()
            result = validate(epoch, **kwargs)
            val_seconds[0] += time.perf_counter() - tick
            history.append({
                "epoch": epoch, "step": trainer.state.step, "seconds": time.perf_counter() - start, "mIoU": result["mIoU"],
                "IoU": [None if math.isnan(iou) else iou for iou in result["IoU"].values()],
            })
            out.write_text(json.dumps({"history": history, "partial": True}))  # what a kill would leave
            return result

        trainer.validate = timed_validate  # type: ignore[method-assign]
        setup = time.perf_counter() - start
        metrics = trainer.fit()
        run_log.close()
        total = time.perf_counter() - start
    data = timer.seconds
    result = {
        "history": history, "steps": metrics["steps"], "epochs": metrics["epochs"], "seconds": total, "stopped_by": metrics["stopped_by"],
        "time": {"data": data + setup, "train": total - setup - data - val_seconds[0], "val": val_seconds[0]},
        "resolved": {key: OmegaConf.select(run_cfg, key) for key in (
            "dataset.mean", "dataset.std", "dataset.size_mode", "dataset.num_workers", "dataset.cache", "optimizer.lr", "model.depth", "trainer.val_every",
            "loss.weight",
        )},
    }
    out.write_text(json.dumps(result, default=lambda value: OmegaConf.to_container(value) if OmegaConf.is_config(value) else str(value)))


# --------------------------------------------------------------------------- the comparison
def largest_fall(values: list[float]) -> float:
    """The largest drop from the best value so far to a later validation."""
    best, fall = -math.inf, 0.0
    for value in values:
        best = max(best, value)
        fall = max(fall, best - value)
    return fall


def run_pair(spec: dict[str, Any], budget: float, overrides: list[str], work: Path, repeat: int) -> dict[str, dict[str, Any]]:
    """Both sides at once, each on its own core; their results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    spec_file = work / f"spec_{spec['name']}.json"
    spec_file.write_text(json.dumps(spec))
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else {0}
    pin = ["taskset", "-c"] if len(cores) >= 2 and subprocess.run(["which", "taskset"], capture_output=True).returncode == 0 else None
    processes, outputs = {}, {}
    sides = ("segtrain", "plain") if repeat % 2 == 0 else ("plain", "segtrain")  # swap the cores every repeat
    for core, side in enumerate(sides):
        outputs[side] = work / f"{spec['name']}_{side}_{repeat}.json"
        command = [
            sys.executable, __file__, "--worker", side, "--spec", str(spec_file), "--budget", str(budget), "--out", str(outputs[side]),
            "--seed", str(repeat), *overrides,
        ]
        if pin:
            command = [*pin, str(sorted(cores)[core]), *command]
        processes[side] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for side in ("segtrain", "plain"):
        process = processes[side]
        try:
            log, _ = process.communicate(timeout=2 * budget + 180)
        except subprocess.TimeoutExpired:
            process.kill()
            log, _ = process.communicate()
        if process.returncode != 0 and not outputs[side].exists():
            raise RuntimeError(f"{side} worker failed:\n{log[-4000:]}")
        results[side] = json.loads(outputs[side].read_text())
    return results


def rows_for(name: str, seed: int, side: str, result: dict[str, Any], budget: float) -> list[str]:
    history = [entry for entry in result["history"] if entry["seconds"] <= budget * 1.05]
    curve = [entry["mIoU"] for entry in history]
    timing = result.get("time", {})
    total = max(sum(timing.values()), 1e-9)
    split = " / ".join(f"{timing.get(key, 0):.0f} ({100 * timing.get(key, 0) / total:.0f} %)" for key in ("data", "train", "val"))
    shown = curve if len(curve) <= 12 else curve[:: math.ceil(len(curve) / 12)] + curve[-1:]
    full = f"{max(e['full_mIoU'] for e in history):.3f}" if history and "full_mIoU" in history[0] else "-"
    return [
        name, str(seed), side, f"{max(curve):.3f}" if curve else "-", full, f"{largest_fall(curve):.3f}", " ".join(f"{v:.2f}" for v in shown),
        str(len(history)), str(history[-1]["step"] if history else 0), f"{result.get('seconds', 0):.0f}", split,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="wall-clock seconds each side trains and validates")
    parser.add_argument("--dataset", choices=["isbi", "folder", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each pair, run k with seed k on both sides (for spreads)")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny data and budget: checks the code path, not the result")
    parser.add_argument("--worker", choices=["segtrain", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for the segtrain side, e.g. optimizer.lr=0.002")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        sys.path.insert(0, str(REPO))
        if args.worker == "plain":
            plain_worker(spec, args.budget, Path(args.out), args.seed)
        else:
            segtrain_worker(spec, args.budget, Path(args.out), args.overrides, args.seed)
        return
    if args.smoke:
        args.budget, args.repeats = 8.0, 1
    names = ["isbi", "folder"] if args.dataset == "both" else [args.dataset]
    if "isbi" in names and not ISBI.is_dir():
        print(f"isbi: {ISBI} not found, skipped")
        names.remove("isbi")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import machine, print_table

    print(f"machine: {machine()}")
    print(f"budget {args.budget:.0f} s per side; segtrain overrides: {' '.join(args.overrides) or 'none'}")
    rows = []
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        for name in names:
            root = work / "street"
            if name == "folder":
                height, width = (72, 96) if args.smoke else (360, 480)
                make_folder(root, 12 if args.smoke else 123, 4 if args.smoke else 51, height, width)
            spec = dataset_spec(name, root, args.smoke)
            for repeat in range(args.repeats):
                load = os.getloadavg()[0]
                results = run_pair(spec, args.budget, args.overrides, work, repeat)
                print(f"{name} run {repeat + 1} (seed {repeat}): load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
                for side in ("segtrain", "plain"):
                    # --smoke checks the code path: a validation just past its tiny budget still counts.
                    rows.append(rows_for(name, repeat, side, results[side], math.inf if args.smoke else args.budget))
                    print(f"  {side}: {json.dumps({k: v for k, v in results[side].items() if k != 'history'})}")
                    if results[side]["history"]:
                        best = max(results[side]["history"], key=lambda entry: entry["mIoU"])
                        shown = " ".join("-" if iou is None else f"{iou:.2f}" for iou in best["IoU"])
                        print(f"  {side}: per-class IoU at the best validation (step {best['step']}): {shown}")
    print_table(
        ["data", "seed", "side", "best mIoU", "full-size", "largest fall", "curve (val mIoU)", "validations", "steps", "seconds", "time data / train / val (s)"],
        rows,
    )


if __name__ == "__main__":
    main()
