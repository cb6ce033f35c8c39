"""What segtrain's trainer costs against the shortest hand-written PyTorch loop, on the CPU.

    python benchmarks/overhead.py            # the table in benchmarks/README.md (a few minutes on 2 cores)
    python benchmarks/overhead.py --smoke    # tiny sizes, one round (CI keeps it working)
    python benchmarks/overhead.py trainer.keep_freed_memory=false   # with config overrides

Same model object, optimizer, loss and batches: (a) segtrain's ``Trainer.train_one_epoch``
built from the real config with default trainer settings (log_every=10, TensorBoard on,
progress bar on, its own DataLoader with num_workers=0); (b) a plain loop over the same
batches already in memory (zero_grad, forward, loss, backward, step; no logging). After
one warm-up round of each, the two alternate in rounds of ``--steps`` optimizer steps
(segtrain first in odd rounds, plain first in even ones); the table gives medians over
rounds. "ratio" is segtrain's steps/s over the plain loop's (1.00: no overhead), from wall
time and from process CPU time (the latter less disturbed by other processes); "ratio range"
the lowest and highest round; "overhead ms/step" the difference of the median step times;
"data wait" the share of segtrain's time blocked on its DataLoader's next().
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import build_bench, interleaved_rounds, machine, print_table, set_threads

TARGET = 0.97


def model_overrides(model: str, unet_width: int) -> list[str]:
    return ["model=unet", f"model.width={unet_width}"] if model == "unet" else [f"model={model}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the code path, not the speed")
    parser.add_argument("--models", nargs="+", default=["unet", "lraspp_mobilenet_v3_large"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--unet-width", type=int, default=8, help="model.width of the UNet (depth: the config's auto, 4 at 256 px)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round (log_every=10: one logged step per round)")
    parser.add_argument("--rounds", type=int, default=12)
    # One thread by default: on a CPU shared with other processes, two threads that spin at every op's
    # barrier made the same step up to 6x slower and the rounds far noisier (see benchmarks/README.md).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default, one per core)")
    parser.add_argument("overrides", nargs="*", help="more config overrides for both loops' setup, e.g. trainer.keep_freed_memory=false")
    args = parser.parse_args()
    extra = list(args.overrides)
    if args.smoke:
        args.size, args.batch_size, args.unet_width, args.steps, args.rounds = 64, 2, 4, 4, 1
        extra.append("trainer.log_every=2")  # so that the logging path runs in the few smoke steps
    set_threads(args.threads)
    print(f"machine: {machine()}")
    print(
        f"data: shapes {args.size}x{args.size}, batch {args.batch_size}, {args.steps} steps per round, {args.rounds} rounds "
        f"after one warm-up round; UNet width {args.unet_width}; trainer defaults (log_every 10, TensorBoard on, progress bar on)"
        + (f"; overrides: {' '.join(extra)}" if extra else "")
    )
    rows = []
    for model in args.models:
        overrides = [
            "device_list=[]", f"dataset.size={args.size}", f"dataset.batch_size={args.batch_size}",
            f"dataset.train_samples={args.steps * args.batch_size}", f"dataset.val_samples={args.batch_size}",
            *model_overrides(model, args.unet_width), *extra,
        ]
        with tempfile.TemporaryDirectory() as run_dir:
            bench = build_bench(overrides, Path(run_dir))
            timings = interleaved_rounds(bench, args.rounds)
            bench.trainer.run_log.close()
        ratio = timings.ratio("wall")
        rows.append([
            model, f"{timings.steps_per_second('plain'):.3f}", f"{timings.steps_per_second('segtrain'):.3f}",
            f"{ratio:.3f}", f"{timings.ratio('cpu'):.3f}", f"{min(timings.plain_wall[i] / w for i, w in enumerate(timings.segtrain_wall)):.3f}"
            f"-{max(timings.plain_wall[i] / w for i, w in enumerate(timings.segtrain_wall)):.3f}",
            f"{1000 * (1 / timings.steps_per_second('segtrain') - 1 / timings.steps_per_second('plain')):.1f}",
            f"{100 * timings.data_wait_fraction():.2f} %", "yes" if ratio >= TARGET else "no",
        ])
    print_table(
        ["model", "plain steps/s", "segtrain steps/s", "ratio (wall)", "ratio (CPU)", "ratio range", "overhead ms/step", "segtrain data wait", f">= {TARGET}"],
        rows,
    )


if __name__ == "__main__":
    main()
