"""Pre-flight audit: read every mask once before the first step and fail with a readable message.

Checks, naming files: unpaired images or masks, unreadable files, image/mask size
mismatches, mask values that belong to no class (with the fix, e.g. "set
dataset.mask_values=[0, 255]"), empty splits, and whole validation images of different
sizes in one batch. Reports per-class pixel counts (they feed ``auto`` loss weights)
and warns about classes that never occur in the training masks.

Each file's result (image size, mask size, histogram of raw mask values) is cached under
``$SEGTRAIN_CACHE_DIR`` (default ``~/.cache/segtrain``) by path, modification time and
size, so a second run re-reads only files that changed. Images are only opened for
their header; masks are decoded in a thread pool (PNG decoding releases the GIL).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segtrain.cache import cache_root
from segtrain.datasets.folder import VOLUME_EXTENSIONS, MaskEncoder, SegmentationFiles, read_mask
from segtrain.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
EXAMPLES = 5  # files named per problem


class AuditError(ConfigError):
    """The data cannot be trained on as configured; the message lists every problem found."""


@dataclass
class AuditReport:
    """What the audit found: per-split file and class pixel counts (ignored pixels left out)."""

    class_names: list[str]
    files: dict[str, int]
    pixel_counts: dict[str, np.ndarray]
    ignored_pixels: dict[str, int]
    seconds: float = 0.0
    cached_files: int = 0
    warnings: list[str] = field(default_factory=list)
    val_sizes: dict[tuple[int, ...], str] = field(default_factory=dict)  # each validation image size and one file of it

    @property
    def train_counts(self) -> torch.Tensor:
        """Class pixel counts of the training masks, for ``auto`` loss parameters."""
        return torch.as_tensor(self.pixel_counts["train"], dtype=torch.int64)

    def table(self) -> str:
        """Per-class pixel counts and shares of each split, as printed by ``audit_only=true``."""
        splits = list(self.pixel_counts)
        width = max(12, *(len(name) for name in self.class_names))
        header = f"{'class':<{width}}" + "".join(f"{split + ' pixels':>16}{split + ' %':>10}" for split in splits)
        lines = [header, "-" * len(header)]
        totals = {split: max(int(self.pixel_counts[split].sum()), 1) for split in splits}
        for index, name in enumerate(self.class_names):
            cells = "".join(
                f"{int(self.pixel_counts[split][index]):>16,}{100 * self.pixel_counts[split][index] / totals[split]:>10.2f}"
                for split in splits
            )
            lines.append(f"{name:<{width}}{cells}")
        lines.append(f"{'(ignored)':<{width}}" + "".join(f"{self.ignored_pixels[split]:>16,}{'':>10}" for split in splits))
        lines.append(f"{'(files)':<{width}}" + "".join(f"{self.files[split]:>16,}{'':>10}" for split in splits))
        return "\n".join(lines)


def can_audit(dataset: Any) -> bool:
    return isinstance(dataset, SegmentationFiles)


def audit(
    datasets: dict[str, SegmentationFiles],
    class_names: list[str],
    val_batch_size: int = 1,
    cache_dir: Path | None = None,
) -> AuditReport:
    """Scan every pair of every split once; raise :class:`AuditError` listing all problems, else report."""
    start = time.perf_counter()
    problems: list[str] = []
    report = AuditReport(class_names, {}, {}, {})
    for split, dataset in datasets.items():
        encoder = dataset.encoder
        problems += _unpaired(split, dataset)
        if len(dataset) == 0:
            problems.append(f"{split}: the split is empty (no image/mask pairs); check the folders and dataset.val_fraction")
            report.files[split], report.ignored_pixels[split] = 0, 0
            report.pixel_counts[split] = np.zeros(encoder.num_classes, dtype=np.int64)
            continue
        records, cached = _scan(dataset.pairs, encoder.rgb, cache_dir)
        report.cached_files += cached
        problems += _file_problems(split, dataset.pairs, records)
        counts, ignored, value_problem = _count_classes(split, dataset.pairs, records, encoder)
        problems += value_problem
        report.files[split], report.pixel_counts[split], report.ignored_pixels[split] = len(dataset), counts, ignored
        if split == "val":
            for (image, _), record in zip(dataset.pairs, records):
                if record.get("image_shape"):
                    report.val_sizes.setdefault(tuple(record["image_shape"]), image.name)
        if split == "val" and val_batch_size > 1:
            sizes = {tuple(record["image_shape"]) for record in records if record.get("image_shape")}
            if len(sizes) > 1:
                problems.append(
                    f"val: dataset.val_batch_size={val_batch_size} but the validation images have {len(sizes)} different sizes "
                    f"(e.g. {', '.join('x'.join(map(str, s)) for s in sorted(sizes)[:3])}); whole images of different sizes "
                    "do not batch: set dataset.val_batch_size=1"
                )
    report.seconds = time.perf_counter() - start
    if problems:
        raise AuditError("pre-flight data audit failed:\n- " + "\n- ".join(problems))
    absent = [name for name, count in zip(class_names, report.pixel_counts.get("train", [])) if count == 0]
    if absent:
        report.warnings.append(
            f"classes that never occur in the training masks: {', '.join(absent)} (check dataset.num_classes / dataset.mask_values)"
        )
    return report


def check_ignore_index(num_classes: int, ignore_index: int | None, class_names: list[str] | None = None) -> None:
    """Refuse an ignore index that is one of the classes, ``[0, num_classes)``: that class would be left out of
    the loss and the metrics, never learned, and reported at IoU 0 (or NaN) as if it were absent from the data."""
    if ignore_index is None or isinstance(ignore_index, bool) or not 0 <= int(ignore_index) < int(num_classes):
        return
    index = int(ignore_index)
    name = f"class {class_names[index]!r}" if class_names and index < len(class_names) else f"class {index}"
    raise ConfigError(
        f"dataset.ignore_index={index} is {name} (dataset.num_classes={num_classes}): its pixels would be left out of "
        f"the loss and the metrics, never learned. Set dataset.ignore_index to a value that is no class (e.g. 255, "
        f"or null to ignore nothing); if the masks mark 'do not care' pixels with {index}, re-save them with 255 there"
    )


def log_report(report: AuditReport) -> None:
    log.info(
        "data audit: %s files checked in %.1f s (%d from the cache)\n%s",
        " + ".join(f"{count} {split}" for split, count in report.files.items()), report.seconds, report.cached_files, report.table(),
    )
    for warning in report.warnings:
        log.warning(warning)


def _names(paths: list[Path]) -> str:
    shown = ", ".join(path.name for path in paths[:EXAMPLES])
    return shown + (f" and {len(paths) - EXAMPLES} more" if len(paths) > EXAMPLES else "")


def _unpaired(split: str, dataset: SegmentationFiles) -> list[str]:
    problems = []
    for paths, what, missing in ((dataset.unpaired_images, "images", "mask"), (dataset.unpaired_masks, "masks", "image")):
        if paths:
            problems.append(
                f"{split}: {len(paths)} {what} without a {missing} of the same file stem in {paths[0].parent}: {_names(paths)}"
                " (images and masks pair by stem: a.jpg with a.png)"
            )
    return problems


def _file_problems(split: str, pairs: list[tuple[Path, Path]], records: list[dict[str, Any]]) -> list[str]:
    unreadable = [f"{record['error']}" for record in records if record.get("error")]
    mismatched = [
        f"{image.name} {'x'.join(map(str, record['image_shape']))} vs mask {'x'.join(map(str, record['mask_shape']))}"
        for (image, _), record in zip(pairs, records)
        if not record.get("error") and record["image_shape"] != record["mask_shape"]
    ]
    problems = []
    if unreadable:
        problems.append(f"{split}: {len(unreadable)} unreadable files: " + "; ".join(unreadable[:EXAMPLES]))
    if mismatched:
        more = f" and {len(mismatched) - EXAMPLES} more" if len(mismatched) > EXAMPLES else ""
        problems.append(f"{split}: {len(mismatched)} images differ in size from their masks: " + ", ".join(mismatched[:EXAMPLES]) + more)
    return problems


def _count_classes(
    split: str, pairs: list[tuple[Path, Path]], records: list[dict[str, Any]], encoder: MaskEncoder
) -> tuple[np.ndarray, int, list[str]]:
    """Class pixel counts and ignored pixels of a split, and a problem for values that belong to no class."""
    counts = np.zeros(encoder.num_classes, dtype=np.int64)
    ignored, unknown_files = 0, {}
    seen: set[int] = set()
    for (_, mask_path), record in zip(pairs, records):
        if record.get("error"):
            continue
        values, value_counts = np.asarray(record["values"], dtype=np.int64), np.asarray(record["counts"], dtype=np.int64)
        seen.update(values.tolist())
        classes = encoder.classes_of(values)
        known = (classes >= 0) & (classes < encoder.num_classes) & (classes != (-2 if encoder.ignore_index is None else encoder.ignore_index))
        counts += np.bincount(classes[known], weights=value_counts[known], minlength=encoder.num_classes).astype(np.int64)
        ignored += int(value_counts[classes == encoder.ignore_index].sum()) if encoder.ignore_index is not None else 0
        for value in values[classes < 0].tolist():
            unknown_files.setdefault(value, []).append(mask_path)
    if not unknown_files:
        return counts, ignored, []
    described = ", ".join(
        f"{encoder.describe(value)} (in {len(files)} files, e.g. {_names(files[:2])})" for value, files in sorted(unknown_files.items())[:EXAMPLES]
    )
    message = f"{split}: mask values belong to no class: {described}; expected {encoder.expected()}"
    return counts, ignored, [message + _value_fix(seen, encoder)]


def _value_fix(seen: set[int], encoder: MaskEncoder) -> str:
    """The config change that would make the values seen in the masks valid."""
    values = sorted(value for value in seen if encoder.rgb or value != encoder.ignore_index)
    shown = ", ".join(encoder.describe(v) for v in values[:12]) + (", ..." if len(values) > 12 else "")
    if encoder.rgb:
        return f". The masks hold the colours {shown}: list each class's colour in dataset.mask_values"
    if len(values) == encoder.num_classes:
        return (
            f". The masks hold {' and '.join(map(str, values))} but dataset.num_classes={encoder.num_classes}: "
            f"set dataset.mask_values=[{','.join(map(str, values))}]"
        )
    return (
        f". The masks hold {len(values)} distinct values ({shown}) for dataset.num_classes={encoder.num_classes}: set "
        "dataset.num_classes and dataset.mask_values to match, or dataset.ignore_index for a 'do not care' value"
    )


# --- scanning, with a per-file cache -------------------------------------------------------


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_mtime_ns, stat.st_size]


def _scan(pairs: list[tuple[Path, Path]], rgb: bool, cache_dir: Path | None) -> tuple[list[dict[str, Any]], int]:
    """One record per pair (from the cache where the files are unchanged), and how many came from the cache."""
    cache_file = _cache_file(pairs, rgb, cache_dir)
    cached: dict[str, Any] = {}
    if cache_file.exists():
        try:
            content = json.loads(cache_file.read_text())
            cached = content["records"] if content.get("version") == CACHE_VERSION else {}
        except (OSError, ValueError, KeyError):
            cached = {}  # a broken cache is re-built, never trusted
    keys = [f"{image}|{mask}" for image, mask in pairs]
    stats = [_stat_pair(image, mask) for image, mask in pairs]
    todo = [i for i, (key, stat) in enumerate(zip(keys, stats)) if cached.get(key, {}).get("stat") != stat or stat is None]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        fresh = list(pool.map(lambda i: _inspect(*pairs[i], rgb), todo))
    records = {key: cached[key] for key in keys if key in cached}
    for i, record in zip(todo, fresh):
        records[keys[i]] = {**record, "stat": stats[i]}
    if todo:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache_file.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps({"version": CACHE_VERSION, "records": {key: records[key] for key in keys}}))
            os.replace(temporary, cache_file)
        except OSError as error:  # a read-only home must not stop training
            log.warning("data audit: could not write the cache %s (%s)", cache_file, error)
    return [records[key] for key in keys], len(pairs) - len(todo)


def _stat_pair(image: Path, mask: Path) -> list[int] | None:
    try:
        return _stat(image) + _stat(mask)
    except OSError:
        return None


def _cache_file(pairs: list[tuple[Path, Path]], rgb: bool, cache_dir: Path | None) -> Path:
    cache_dir = Path(cache_dir or cache_root()) / "audit"
    digest = hashlib.sha1(f"{rgb}\n".encode() + "\n".join(str(mask.resolve()) for _, mask in pairs).encode()).hexdigest()
    return cache_dir / f"{digest[:20]}.json"


def _inspect(image_path: Path, mask_path: Path, rgb: bool) -> dict[str, Any]:
    """Spatial sizes of the image (header only) and mask, and the histogram of raw mask values."""
    try:
        image_shape = _image_shape(image_path)
    except Exception as error:  # any reader failure is a finding about the file, not a crash
        return {"error": f"{image_path} ({type(error).__name__}: {error})"}
    try:
        raw = read_mask(mask_path, rgb)
    except Exception as error:
        return {"error": f"{mask_path} ({type(error).__name__}: {error})"}
    if raw.dtype.kind not in "iub":
        if not np.all(np.mod(raw, 1) == 0):
            return {"error": f"{mask_path} (mask of non-integer values, dtype {raw.dtype})"}
        raw = raw.astype(np.int64)
    flat = raw.reshape(-1).astype(np.uint8) if raw.dtype == np.bool_ else raw.reshape(-1)
    if flat.dtype in (np.uint8, np.uint16):
        histogram = np.bincount(flat, minlength=1)
        values = np.flatnonzero(histogram)
        counts = histogram[values]
    else:
        values, counts = np.unique(flat, return_counts=True)
    return {"image_shape": list(image_shape), "mask_shape": list(raw.shape), "values": values.tolist(), "counts": counts.tolist()}


def _image_shape(path: Path) -> tuple[int, ...]:
    if path.suffix.lower() in VOLUME_EXTENSIONS:
        shape = np.load(path, mmap_mode="r").shape
        if len(shape) not in (3, 4):
            raise ValueError(f"volume of shape {shape}; expected (D, H, W) or (C, D, H, W)")
        return tuple(shape[-3:])
    with Image.open(path) as image:
        width, height = image.size
    return height, width
