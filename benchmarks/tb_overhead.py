"""What TensorBoard logging costs a run: ``python benchmarks/tb_overhead.py [--run-dir DIR] [train.py overrides ...]``.

Runs ``python train.py`` (the default command unless overrides are given) into a
temporary run dir and reads ``metrics.json``: ``log_seconds`` is the wall time spent
inside ``RunLog`` (scalars, pictures and their PNG encoding, heatmaps, HParams,
flushes, metrics.json), measured with ``time.perf_counter`` in the run itself. Two costs
of logging live outside ``RunLog`` and are timed here on the same model: the gradient
norm on logging steps and the forward pass over the pictured validation samples.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]


def seconds_per_call(function, repeats: int = 20) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def outside_costs(overrides: list[str], validations: int, logging_steps: int) -> dict[str, float]:
    """Seconds spent on grad norms and on predicting the pictured samples over the whole run."""
    from segtrain.build import build
    from segtrain.visualize import fixed_samples

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    components, _ = build(cfg)
    model, device = components.model, components.device
    images, masks = next(iter(components.train_loader))
    components.loss_fn(model(images.to(device)), masks.to(device)).backward()
    gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    grad_norm = seconds_per_call(lambda: torch.nn.utils.get_total_norm(gradients))
    samples = fixed_samples(components.val_loader.dataset, int(cfg.trainer.log_images))
    model.eval()
    with torch.no_grad():
        forward = seconds_per_call(lambda: [model(image[None].to(device)) for image in samples[1]], repeats=5) if samples else 0.0
    return {"grad_norm_seconds": grad_norm * logging_steps, "sample_forward_seconds": forward * validations}


def run(run_dir: str, overrides: list[str]) -> dict:
    command = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", "trainer.progress_bar=false", *overrides]
    print("running:", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def main(overrides: list[str]) -> None:
    """``--run-dir DIR`` first keeps the run (e.g. for docs/make_pictures.py); else it goes to a temporary dir."""
    if overrides[:1] == ["--run-dir"]:
        metrics = run(overrides[1], overrides[2:])
        overrides = overrides[2:]
    else:
        with tempfile.TemporaryDirectory() as run_dir:
            metrics = run(run_dir, overrides)
    log_every = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("trainer.log_every=")), 10)
    extra = outside_costs(overrides, len(metrics["history"]), metrics["steps"] // log_every)
    wall = metrics["wall_seconds"]
    rows = {
        "run wall time": wall,
        "inside RunLog (log_seconds)": metrics["log_seconds"],
        "grad norms on logging steps (estimated)": extra["grad_norm_seconds"],
        "forward on pictured samples (estimated)": extra["sample_forward_seconds"],
    }
    total = sum(value for name, value in rows.items() if name != "run wall time")
    for name, value in rows.items():
        print(f"{name:<42} {value:8.2f} s  {100 * value / wall:6.2f} %")
    print(f"{'all logging':<42} {total:8.2f} s  {100 * total / wall:6.2f} %")


if __name__ == "__main__":
    main(sys.argv[1:])
