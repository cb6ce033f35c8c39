"""Forward+backward time and peak memory of segtrain's focal loss against cross-entropy,
a per-class-loop focal and torchvision's sigmoid_focal_loss.

The focal runs as in training (the loader has checked the target's values, so the loss
reads nothing back to the host) and as a direct call with a CPU target (values checked).

    python benchmarks/losses.py            # the table in benchmarks/README.md
    python benchmarks/losses.py --smoke    # tiny sizes, two iterations (CI)

Time: median over repeats of one forward+backward, the methods run round-robin within
each repeat so a busy machine slows them alike; "wall" is perf_counter, "CPU" is the
process's CPU time (time.process_time), less disturbed by other processes on a shared
machine (with several threads it also counts their spin-waiting). Memory: the CPU allocator's allocation
and free events recorded by torch.profiler (profile_memory=True) during one
forward+backward, replayed in time order; the peak of the running total is what the step
allocated on top of the logits and target that existed before it (the logits' .grad
included). "x logits" divides it by the logits' bytes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from torchvision.ops import sigmoid_focal_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from segtrain.host_memory import keep_freed_memory  # noqa: E402
from segtrain.losses import build_loss  # noqa: E402

IGNORE_INDEX = 255
GAMMA = 2.0
STEPS_PER_SAMPLE = 3  # consecutive timed forward+backward steps of one method per sample


def naive_focal(logits: Tensor, target: Tensor) -> Tensor:
    """Softmax focal written the naive way: a Python loop over classes, each with a mask and a
    two-column (not c, c) probability table; the same value as segtrain's focal."""
    probs = torch.softmax(logits, 1)
    valid = target != IGNORE_INDEX
    total = logits.new_zeros(())
    for c in range(logits.shape[1]):
        is_c = target == c
        p_c = probs[:, c]
        table = torch.stack([1 - p_c, p_c], dim=1)
        p_t = table.gather(1, is_c.long().unsqueeze(1)).squeeze(1)
        total = total + (-((1 - p_t) ** GAMMA) * torch.log(p_t) * is_c).sum()
    return total / valid.sum()


def methods(target: Tensor, num_classes: int) -> dict[str, Callable[[Tensor], Tensor]]:
    focal = build_loss("focal", gamma=GAMMA, alpha=None, activation="softmax", ignore_index=IGNORE_INDEX)
    # As the trainer calls it: the loader has checked the batch's values, the loss does not read them back.
    focal_in_training = build_loss("focal", gamma=GAMMA, alpha=None, activation="softmax", ignore_index=IGNORE_INDEX)
    focal_in_training.check_targets = False
    # torchvision's loss takes a float target of the logits' shape and knows no ignore index.
    one_hot = F.one_hot(target.clamp_max(num_classes - 1), num_classes).movedim(-1, 1).float()
    return {
        "segtrain focal (softmax), as in training": lambda x: focal_in_training(x, target),
        "  same, called directly (values checked)": lambda x: focal(x, target),
        "F.cross_entropy": lambda x: F.cross_entropy(x, target, ignore_index=IGNORE_INDEX),
        "per-class-loop focal": lambda x: naive_focal(x, target),
        "torchvision sigmoid_focal_loss": lambda x: sigmoid_focal_loss(x, one_hot, gamma=GAMMA, reduction="mean"),
    }


def step(loss_fn: Callable[[Tensor], Tensor], logits: Tensor) -> None:
    loss_fn(logits).backward()
    logits.grad = None


def peak_bytes(loss_fn: Callable[[Tensor], Tensor], logits: Tensor) -> int:
    """Peak of the bytes allocated (minus freed) during one forward+backward, from the profiler's allocator events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(loss_fn, logits)
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def run_case(shape: tuple[int, ...], repeats: int, warmup: int) -> list[dict[str, object]]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=generator).requires_grad_()
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.05] = IGNORE_INDEX  # 5% unlabelled pixels
    cases = methods(target, shape[1])

    ours, naive = cases["segtrain focal (softmax), as in training"](logits), cases["per-class-loop focal"](logits)
    assert torch.allclose(ours, naive, rtol=1e-4), f"focal {ours.item()} != per-class loop {naive.item()}"

    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu_times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for repeat in range(warmup + repeats):
        # Each method's steps are timed after one untimed step of its own: the first call after
        # another method pays for the pages that method freed (allocator page faults: up to half a
        # millisecond here, more after the 10x-logits methods), which a training loop calling the
        # same loss every step does not. The order rotates so that load drift hits all alike.
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            loss_fn = cases[name]
            step(loss_fn, logits)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(STEPS_PER_SAMPLE):
                step(loss_fn, logits)
            if repeat >= warmup:
                times[name].append((time.perf_counter() - start) / STEPS_PER_SAMPLE)
                cpu_times[name].append((time.process_time() - cpu_start) / STEPS_PER_SAMPLE)
    logits_bytes = logits.numel() * logits.element_size()
    rows = []
    for name, loss_fn in cases.items():
        rows.append({"shape": shape, "method": name, "ms": 1e3 * statistics.median(times[name]),
                     "cpu_ms": 1e3 * statistics.median(cpu_times[name]),
                     "peak": peak_bytes(loss_fn, logits), "logits_bytes": logits_bytes})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, two iterations (CI)")
    parser.add_argument("--repeats", type=int, default=30, help="timed forward+backward per method and case")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--glibc-defaults", action="store_true", help="leave glibc's malloc settings alone (see segtrain/host_memory.py)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # As in a CPU training run (trainer.keep_freed_memory, on by default): freed tensors are reused, not
    # page-faulted back in, which would otherwise add up to half a millisecond to a step here.
    kept = keep_freed_memory() if not args.glibc_defaults else False
    if args.smoke:
        shapes, repeats, warmup = [(2, 3, 16, 16), (1, 3, 4, 8, 8)], 2, 0
    else:
        shapes, repeats, warmup = [(8, 5, 128, 128), (2, 5, 32, 64, 64)], args.repeats, 5

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats} forward+backward; "
          f"freed memory kept (trainer.keep_freed_memory): {kept}")
    print("| logits | method | wall (ms) | vs CE | CPU (ms) | vs CE | loop / this (wall) | peak memory (MiB) | x logits |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape in shapes:
        rows = run_case(shape, repeats, warmup)
        ce = next(row for row in rows if row["method"] == "F.cross_entropy")
        loop = next(row for row in rows if row["method"] == "per-class-loop focal")
        for row in rows:
            print(f"| {tuple(row['shape'])} | {row['method']} | {row['ms']:.2f} | {row['ms'] / ce['ms']:.2f}x "
                  f"| {row['cpu_ms']:.2f} | {row['cpu_ms'] / ce['cpu_ms']:.2f}x | {loop['ms'] / row['ms']:.2f}x "
                  f"| {row['peak'] / 2**20:.1f} | {row['peak'] / row['logits_bytes']:.2f} |")


if __name__ == "__main__":
    main()
