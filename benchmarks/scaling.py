"""Time per epoch of a real ``Trainer.fit`` as the image size doubles and as the dataset grows.

    python benchmarks/scaling.py            # the table in benchmarks/README.md (a few minutes on 2 cores)
    python benchmarks/scaling.py --smoke    # two sizes, two dataset sizes, two epochs (CI)

Each row is a full ``fit`` (training, validation, TensorBoard pictures, checkpoints, all
at the trainer's defaults but a tiny UNet) on the CPU. An epoch's time runs from the end
of one validation to the end of the next; epoch 1 also generates the samples, so the
steady cost is the median of epochs 2..N. The cost grows linearly when "time / work"
(epoch time over pixels x samples, both relative to the sweep's first row) stays at or
below 1 (fixed per-epoch costs are amortised) and "last / 2nd epoch" stays near 1 (no
per-epoch work that grows with the run, such as growing lists or history scans).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import compose_config, machine, print_table, set_threads

from segtrain.build import build
from segtrain.run import make_trainer
from segtrain.run_log import RunLog


def epoch_seconds(overrides: list[str]) -> list[float]:
    """Wall seconds of each epoch of one ``Trainer.fit`` (validation every epoch)."""
    cfg = compose_config(overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        components, run_cfg = build(cfg)
        run_log = RunLog(Path(run_dir), components.class_names, None, cfg.trainer.log_image_size)
        trainer = make_trainer(cfg, components, run_cfg, Path(run_dir), run_log)
        validate, stamps = trainer.validate, [time.perf_counter()]

        def stamped_validate(epoch: int, **kwargs: Any) -> dict[str, Any] | None:
            result = validate(epoch, **kwargs)
            stamps.append(time.perf_counter())
            return result

        trainer.validate = stamped_validate  # type: ignore[method-assign]
        trainer.fit()
        run_log.close()
    return [end - start for start, end in zip(stamps, stamps[1:])]


def sweep(name: str, points: list[tuple[int, int, int]], batch_size: int, epochs: int, model: list[str]) -> list[list[str]]:
    """One row per (size, train samples, val samples), relative to the first point."""
    rows, first = [], None
    for size, train_samples, val_samples in points:
        seconds = epoch_seconds([
            "device_list=[]", f"dataset.size={size}", f"dataset.train_samples={train_samples}",
            f"dataset.val_samples={val_samples}", f"dataset.batch_size={batch_size}", f"trainer.max_epochs={epochs}",
            "trainer.progress_bar=false", *model,
        ])
        steady = statistics.median(seconds[1:])
        work = size**2 * (train_samples + val_samples)
        first = first or (steady, work)
        rows.append([
            name, f"{size}x{size}", str(train_samples), str(val_samples), f"{seconds[0]:.2f}", f"{steady:.3f}",
            f"{steady / first[0]:.2f}", f"{work / first[1]:.0f}", f"{(steady / first[0]) / (work / first[1]):.2f}",
            f"{seconds[-1] / seconds[1]:.2f}",
        ])
        print(f"  done: {name} {size}x{size}, {train_samples} + {val_samples} samples: epochs {[round(s, 3) for s in seconds]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="two points per sweep, two epochs (CI)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    # One thread by default: on a CPU shared with other processes, two threads that spin at every op's
    # barrier made the same step up to 6x slower and the rounds far noisier (see benchmarks/README.md).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default, one per core)")
    args = parser.parse_args()
    sizes, samples, base_size, base_train, base_val = [32, 64, 128, 256], [1, 4, 16], 32, 64, 16
    size_train, size_val = 16, 4
    if args.smoke:
        sizes, samples, base_train, base_val, size_train, size_val, args.epochs = [16, 32], [1, 4], 8, 4, 8, 4, 2
    set_threads(args.threads)
    model = ["model.width=8", "model.depth=2"]
    print(f"machine: {machine()}")
    print(
        f"UNet width 8 depth 2, batch {args.batch_size}, {args.epochs} epochs per row, validation every epoch; "
        "trainer defaults otherwise (log_every 10, TensorBoard with 4 pictured samples, checkpoints on)"
    )
    rows = sweep("image size", [(size, size_train, size_val) for size in sizes], args.batch_size, args.epochs, model)
    rows += sweep("samples", [(base_size, base_train * n, base_val * n) for n in samples], args.batch_size, args.epochs, model)
    print_table(
        ["sweep", "size", "train", "val", "epoch 1 s", "epoch s (median 2..N)", "time x", "work x", "time / work", "last / 2nd epoch"],
        rows,
    )


if __name__ == "__main__":
    main()
