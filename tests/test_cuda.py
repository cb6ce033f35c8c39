"""segtrain on CUDA: the mission's own command, `python train.py ... device_list=[0]`, end to end.

Skipped (with the reason) where CUDA is not available. ``SEGTRAIN_CUDA_DRY_RUN=1`` runs the same
tests on the CPU (``device_list=[]``), leaving out what only CUDA has (fp16 with a GradScaler,
``torch.compile`` of the whole run, NCCL, CUDA out-of-memory, peak GPU memory): that is how
``benchmarks/gpu_check.sh --smoke`` proves this file on a machine without a GPU. The
no-sync-between-forward-and-backward check under ``torch.cuda.set_sync_debug_mode`` lives in
tests/test_host_reads.py (``test_cuda_step_has_no_sync_between_forward_and_backward``).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, TINY, compose_config, run_train_py
from segtrain.checkpoint import load_checkpoint
from segtrain.losses import build_loss, loss_terms, resolve_auto, with_ignore_index
from segtrain.registry import LOSSES

CUDA = torch.cuda.is_available()
DRY_RUN = os.environ.get("SEGTRAIN_CUDA_DRY_RUN") == "1"
pytestmark = pytest.mark.skipif(
    not CUDA and not DRY_RUN,
    reason=f"needs CUDA (torch {torch.__version__}: torch.cuda.is_available() is False); SEGTRAIN_CUDA_DRY_RUN=1 runs it on the CPU",
)
cuda_only = pytest.mark.skipif(not CUDA, reason="a CUDA-only behaviour (NCCL, CUDA out of memory): needs torch.cuda.is_available()")
DEVICE = torch.device("cuda", 0) if CUDA else torch.device("cpu")
ON_DEVICE = [arg if not arg.startswith("device_list=") else ("device_list=[0]" if CUDA else "device_list=[]") for arg in TINY]
# A little more than TINY, so that a GPU step does real work: 64 px, width 16.
RUN = [*ON_DEVICE, "dataset.size=64", "model.width=16", "trainer.log_images=2"]
LOSS_CONFIGS = REPO / "configs" / "loss"
IGNORE = 255


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def check_run_dir(run_dir: Path, steps: int) -> dict:
    """What a user reads back: metrics.json, both checkpoints, the TensorBoard curves."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished"] and metrics["steps"] == steps and metrics["skipped_steps"] == 0
    assert math.isfinite(metrics["best_miou"]) and metrics["images_per_second"] > 0
    for name in ("last.pt", "best.pt"):
        checkpoint = load_checkpoint(run_dir / name)
        assert all(value.device.type == "cpu" for value in checkpoint["model"].values()), "checkpoints load anywhere"
        assert all(torch.isfinite(value).all() for value in checkpoint["model"].values() if value.is_floating_point())
    scalars = read_scalars(run_dir)
    assert {"train/loss", "train/lr", "val/mIoU", "val/loss"} <= set(scalars)
    assert all(math.isfinite(value) for _, value in scalars["train/loss"])
    if CUDA:
        assert "system/gpu_memory_gb" in scalars
    return metrics


PRECISION_CASES = {
    "fp32": ["trainer.precision='32'"],
    "bf16": ["trainer.precision=bf16"],
    "fp16 (GradScaler)": ["trainer.precision='16'"],
    "bf16 + channels_last": ["trainer.precision=bf16", "trainer.channels_last=true"],
    "bf16 + channels_last + compile": ["trainer.precision=bf16", "trainer.channels_last=true", "trainer.compile=true"],
}


@pytest.mark.parametrize("case", PRECISION_CASES)
def test_train_py_on_the_device(case, tmp_path):
    if not CUDA and ("compile" in case or "fp16" in case):
        pytest.skip("dry run: fp16 needs CUDA's GradScaler; compiling on the CPU needs a C++ toolchain and minutes")
    process = run_train_py([f"hydra.run.dir={tmp_path}", *RUN, *PRECISION_CASES[case]], timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    metrics = check_run_dir(tmp_path, steps=2 * 48 // 8)
    log = (tmp_path / "train.log").read_text()
    assert ("training on cuda:0" in log) == CUDA and ("training on the CPU" in log) != CUDA
    assert metrics["best_miou"] > 0


LOSS_NAMES = sorted(path.stem for path in LOSS_CONFIGS.glob("*.yaml"))


def loss_params(name: str, num_classes: int) -> dict:
    params = with_ignore_index(OmegaConf.to_container(OmegaConf.load(LOSS_CONFIGS / f"{name}.yaml"), resolve=True), IGNORE)
    # `auto` weights as the framework resolves them, from class pixel counts.
    if name in ("ce", "nll", "bce"):
        params["weight" if name != "bce" else "pos_weight"] = "auto"
    if name == "focal":
        params["alpha"] = "auto"
    return resolve_auto(params, torch.tensor([500, 120, 40, 9][:num_classes]), num_classes)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("spatial", [(16, 20), (4, 8, 10)], ids=["2d", "3d"])
def test_every_loss_on_the_device_equals_its_cpu_value_and_gradient(name, spatial):
    num_classes = 4
    params = loss_params(name, num_classes)
    loss_fn = build_loss(**params)
    channels = 1 if loss_fn.sigmoid and num_classes == 2 else num_classes
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((2, channels, *spatial), generator=generator) * 3
    target = torch.randint(0, num_classes, (2, *spatial), generator=generator)
    target.view(-1)[::7] = IGNORE
    results = []
    for device in (torch.device("cpu"), DEVICE):
        fn = build_loss(**params).to(device)
        fn.check_targets = False  # as in training: the loader checked the values
        x = logits.to(device).requires_grad_()
        total, terms = loss_terms(fn, x, target.to(device))
        total.backward()
        results.append((total.detach().cpu(), {k: v.cpu() for k, v in terms.items()}, x.grad.cpu()))
    (cpu_total, cpu_terms, cpu_grad), (dev_total, dev_terms, dev_grad) = results
    torch.testing.assert_close(dev_total, cpu_total, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dev_grad, cpu_grad, atol=1e-6, rtol=1e-4)
    assert dev_terms.keys() == cpu_terms.keys()


def test_resume_on_the_device_continues_the_run(tmp_path):
    """Interrupted after epoch 1 (max_epochs=1), resumed to epoch 3: the same steps, curves and, with
    trainer.deterministic=true, the same metrics as the run left alone. On the CPU the weights are
    bitwise equal (tests/test_resume.py); on CUDA deterministic algorithms make them equal up to the
    few ops without a deterministic kernel (warn_only), so this compares metrics to 1e-4."""
    common = [*RUN, "trainer.deterministic=true", "scheduler=none", "trainer.log_images=0"]
    straight = run_train_py([f"hydra.run.dir={tmp_path / 'straight'}", *common, "trainer.max_epochs=3"], timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_train_py([f"hydra.run.dir={tmp_path / 'resumed'}", *common, "trainer.max_epochs=1"], timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train_py(
        [f"hydra.run.dir={tmp_path / 'unused'}", *common, "trainer.max_epochs=3", f"resume={tmp_path / 'resumed'}"], timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    straight_metrics = check_run_dir(tmp_path / "straight", steps=3 * 48 // 8)
    resumed_metrics = check_run_dir(tmp_path / "resumed", steps=3 * 48 // 8)
    for left_alone, resumed in zip(straight_metrics["history"], resumed_metrics["history"], strict=True):
        assert left_alone["epoch"] == resumed["epoch"] and left_alone["step"] == resumed["step"]
        assert resumed["mIoU"] == pytest.approx(left_alone["mIoU"], abs=1e-4)
        assert resumed["loss"] == pytest.approx(left_alone["loss"], rel=1e-4)
    steps = [step for step, _ in read_scalars(tmp_path / "resumed")["train/loss"]]
    assert steps == sorted(set(steps)), "no duplicate points after resume"
    if not CUDA:  # the CPU is bitwise
        assert straight_metrics["history"] == resumed_metrics["history"]


def test_eval_and_predict_on_the_device(tmp_path):
    run = run_train_py([f"hydra.run.dir={tmp_path / 'run'}", *RUN, "trainer.max_epochs=1"], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = check_run_dir(tmp_path / "run", steps=48 // 8)
    evaluation = run_train_py([f"hydra.run.dir={tmp_path / 'eval'}", *RUN, "mode=eval", f"resume={tmp_path / 'run' / 'best.pt'}"], timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert result["mIoU"] == pytest.approx(metrics["best_miou"], abs=1e-4)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(images / f"{index}.png")
    prediction = run_train_py(
        [f"hydra.run.dir={tmp_path / 'predict'}", *RUN, "mode=predict", f"resume={tmp_path / 'run' / 'best.pt'}", f"predict.input={images}"],
        timeout=600,
    )
    assert prediction.returncode == 0, prediction.stderr[-3000:]
    for index in range(2):
        mask = np.array(Image.open(tmp_path / "run" / "predictions" / f"{index}.png"))
        assert mask.shape == (48, 40) and mask.max() < 4


@cuda_only
@pytest.mark.parametrize("devices", [1, 2])
def test_ddp_over_nccl(devices, tmp_path):
    """One GPU: a one-process NCCL group under torchrun (`torchrun --nproc-per-node=1 train.py device_list=[0]`);
    two GPUs: `train.py device_list=[0,1]`, which spawns one NCCL process per device."""
    if torch.cuda.device_count() < devices:
        pytest.skip(f"needs {devices} GPUs, {torch.cuda.device_count()} visible")
    overrides = [*RUN, "model.norm=group", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"]
    if devices == 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(REPO / "train.py"), *overrides]
    else:
        overrides = [arg for arg in overrides if not arg.startswith("device_list=")]
        command = [sys.executable, str(REPO / "train.py"), *overrides, "device_list=[0,1]"]
    process = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-5000:]
    if devices == 2:
        assert "DDP: spawning 2 processes (nccl backend)" in output
    check_run_dir(tmp_path, steps=48 // 8 // devices)


@cuda_only
def test_out_of_memory_ends_with_segtrain_message(tmp_path):
    """An absurd batch on the GPU: a one-line message naming dataset.batch_size and the precision."""
    process = run_train_py(
        [f"hydra.run.dir={tmp_path}", *ON_DEVICE, "dataset.size=512", "dataset.train_samples=512", "dataset.batch_size=512",
         "model.width=64", "model.depth=2", "+dataset.cache=false", "trainer.log_images=0"],
        timeout=600,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 1, output[-3000:]
    assert "CUDA out of memory" in output and "dataset.batch_size=512" in output and "trainer.precision=32" in output
    assert "Traceback" not in output
