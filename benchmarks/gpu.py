"""segtrain on CUDA: images/s, peak memory and data wait per precision / memory-format /
compile switch, each against the plain PyTorch loop on the same GPU.

    python benchmarks/gpu.py                 # CUDA: UNet and deeplabv3_resnet50 at 512x512
    python benchmarks/gpu.py --workers 4     # the same with dataset.num_workers=4
    python benchmarks/gpu.py --smoke         # tiny CPU version of the same code path (CI); also what runs without CUDA

For each model and switch set, segtrain's ``Trainer.train_one_epoch`` (built from the real
config: its DataLoader with the config's worker count and pinned memory, logging every 10
steps, TensorBoard) and a plain loop over the same batches already on the GPU (autocast
and, for fp16, a GradScaler; ``torch.compile`` when compiled) alternate in rounds after a
warm-up round (which also compiles); medians over rounds.

- images/s: batch size x steps / wall time of a round, CUDA synchronised at both ends.
- peak memory: ``torch.cuda.max_memory_allocated`` over one segtrain round, less the
  plain loop's batches held on the GPU meanwhile.
- data wait: the share of segtrain's round spent blocked in the DataLoader's ``next()``
  (CPU side; an upper bound on the GPU's idle time waiting for data).
"""
from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch

from common import Bench, build_bench, interleaved_rounds, machine, print_table, segtrain_round, set_threads

TARGET_RATIO, TARGET_DATA_WAIT = 0.95, 0.05

SWITCHES = {
    "fp32": ["trainer.precision='32'"],
    "bf16": ["trainer.precision=bf16"],
    "fp16": ["trainer.precision='16'"],
    "bf16 + channels_last": ["trainer.precision=bf16", "trainer.channels_last=true"],
    "bf16 + channels_last + compile": ["trainer.precision=bf16", "trainer.channels_last=true", "trainer.compile=true"],
}
# The smoke run (CPU): every code path (autocast + channels_last; torchvision's aux-head loss) in
# few steps. fp16 autocast does not exist on the CPU and compiling takes minutes there.
SMOKE_RUNS = [("unet", "fp32"), ("unet", "bf16 + channels_last"), ("deeplabv3_resnet50", "fp32")]


def peak_memory_gb(bench: Bench) -> float | None:
    """Peak CUDA memory of one segtrain round, less the plain loop's batches (None on the CPU)."""
    if bench.device.type != "cuda":
        return None
    held = sum(images.nbytes + masks.nbytes for images, masks in bench.batches)
    torch.cuda.reset_peak_memory_stats(bench.device)
    segtrain_round(bench)
    return (torch.cuda.max_memory_allocated(bench.device) - held) / 1e9


def measure(overrides: list[str], rounds: int, batch_size: int) -> list[str]:
    with tempfile.TemporaryDirectory() as run_dir:
        bench = build_bench(overrides, Path(run_dir))
        plain_model = torch.compile(bench.components.model) if bench.trainer.settings.compile else None
        timings = interleaved_rounds(bench, rounds, plain_model)
        memory = peak_memory_gb(bench)
        bench.trainer.run_log.close()
    del bench, plain_model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ratio, wait = timings.ratio("wall"), timings.data_wait_fraction()
    return [
        f"{batch_size * timings.steps_per_second('plain'):.1f}", f"{batch_size * timings.steps_per_second('segtrain'):.1f}",
        f"{ratio:.3f}", "n/a (CPU)" if memory is None else f"{memory:.2f}", f"{100 * wait:.2f} %",
        "yes" if ratio >= TARGET_RATIO and wait < TARGET_DATA_WAIT else "no",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path (CI)")
    parser.add_argument("--models", nargs="+", default=["unet", "deeplabv3_resnet50"])
    parser.add_argument("--switches", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="dataset.num_workers (default: the dataset config's)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU (default: torch's)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    runs = [(model, name) for model in args.models for name in args.switches]
    if not cuda:
        args.size, args.batch_size, args.steps, args.rounds = 32, 2, 2, 1
        runs = [run for run in SMOKE_RUNS if run in runs]
        args.threads = args.threads or 1  # a busy CI machine makes two spinning threads 10-100x slower
        print("no CUDA or --smoke: a tiny CPU run of the same code path; its numbers say nothing about GPU speed")
    set_threads(args.threads)
    print(f"machine: {machine()}")
    workers = [f"dataset.num_workers={args.workers}"] if args.workers is not None else []
    print(
        f"data: shapes {args.size}x{args.size}, batch {args.batch_size}, {args.steps} steps per round, {args.rounds} rounds "
        f"after one warm-up round; dataset.num_workers={args.workers if args.workers is not None else 'config default'}; "
        "trainer defaults otherwise (log_every 10, TensorBoard on, progress bar off)"
    )
    rows = []
    for model, name in runs:
        overrides = [
            f"device_list={'[0]' if cuda else '[]'}", f"model={model}", f"dataset.size={args.size}",
            f"dataset.batch_size={args.batch_size}", f"dataset.train_samples={args.steps * args.batch_size}",
            f"dataset.val_samples={args.batch_size}", "trainer.progress_bar=false", *workers, *SWITCHES[name],
        ]
        rows.append([model, name, *measure(overrides, args.rounds, args.batch_size)])
        print(f"  done: {model}, {name}", flush=True)
    print_table(
        ["model", "switches", "plain img/s", "segtrain img/s", "ratio", "peak memory GB", "data wait",
         f"ratio >= {TARGET_RATIO} and wait < {TARGET_DATA_WAIT:.0%}"],
        rows,
    )


if __name__ == "__main__":
    main()
