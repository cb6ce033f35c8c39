"""Training that survives real work: exact resume, preemption, safe checkpoints, health guards."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import segtrain.run
from conftest import REPO, TINY, compose_config
from segtrain import trainer as trainer_module
from segtrain.checkpoint import load_checkpoint, save_checkpoint
from segtrain.registry import LOSSES
from segtrain.trainer import Interrupted
from segtrain.errors import ConfigError, TrainingError
from omegaconf import OmegaConf

DETERMINISTIC = [*TINY, "model.width=4", "trainer.deterministic=true", "dataset.train_samples=32"]


def final_weights(run_dir):
    return load_checkpoint(run_dir / "last.pt")["model"]


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs"


def metrics_without_timing(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return [{k: v for k, v in entry.items()} for entry in metrics["history"]], metrics["steps"], metrics["best_miou"]


def interrupt_when(monkeypatch, condition):
    """Send SIGTERM to this process once ``condition(trainer)`` holds after an optimizer step or a validation."""
    original_log_step = trainer_module.Trainer.optimizer_step
    original_validate = trainer_module.Trainer.validate

    def optimizer_step(self):
        norm = original_log_step(self)
        if condition(self, "step"):
            os.kill(os.getpid(), signal.SIGTERM)
        return norm

    def validate(self, epoch, **kwargs):
        result = original_validate(self, epoch, **kwargs)
        if condition(self, "validation"):
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer_module.Trainer, "optimizer_step", optimizer_step)
    monkeypatch.setattr(trainer_module.Trainer, "validate", validate)


def test_resume_at_epoch_boundary_is_bitwise_exact(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    segtrain.run.train(compose_config([*DETERMINISTIC, "trainer.max_epochs=4"]), straight)

    with monkeypatch.context() as patch:
        interrupt_when(patch, lambda trainer, where: where == "validation" and trainer.state.epoch == 3)
        with pytest.raises(Interrupted):
            segtrain.run.train(compose_config([*DETERMINISTIC, "trainer.max_epochs=4"]), resumed)
    state = load_checkpoint(resumed / "last.pt")["state"]
    assert (state["epoch"], state["batch"]) == (3, 0), "stopped after epoch 2"
    segtrain.run.train(compose_config([*DETERMINISTIC, "trainer.max_epochs=4", f"resume={resumed}"]), tmp_path / "unused")

    assert_same_weights(final_weights(straight), final_weights(resumed))
    assert metrics_without_timing(straight) == metrics_without_timing(resumed)


def test_resume_mid_epoch_is_bitwise_exact(tmp_path, monkeypatch):
    overrides = [*DETERMINISTIC, "trainer.max_epochs=2", "trainer.ckpt_every_steps=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    segtrain.run.train(compose_config(overrides), straight)
    with monkeypatch.context() as patch:
        # state.step counts finished steps: the signal arrives during step 5.
        interrupt_when(patch, lambda trainer, where: where == "step" and trainer.state.step == 4)
        with pytest.raises(Interrupted):
            segtrain.run.train(compose_config(overrides), resumed)
    state = load_checkpoint(resumed / "last.pt")["state"]
    assert (state["epoch"], state["batch"], state["step"]) == (2, 1, 5), "4 batches per epoch: stopped after batch 1 of epoch 2"
    segtrain.run.train(compose_config([*overrides, f"resume={resumed / 'last.pt'}"]), tmp_path / "unused")
    assert_same_weights(final_weights(straight), final_weights(resumed))
    assert metrics_without_timing(straight) == metrics_without_timing(resumed)


def test_resume_continues_event_files_without_duplicate_points(tmp_path, monkeypatch):
    from test_train import read_scalars

    overrides = [*DETERMINISTIC, "trainer.max_epochs=3"]
    original = trainer_module.Trainer.optimizer_step

    def crash_in_step_8(self):
        if self.state.step == 7:
            raise RuntimeError("simulated crash")
        return original(self)

    with monkeypatch.context() as patch:
        # A crash after step 7 was logged; the newest checkpoint is from step 5, so the resume repeats steps 6-7.
        patch.setattr(trainer_module.Trainer, "optimizer_step", crash_in_step_8)
        with pytest.raises(RuntimeError, match="simulated crash"):
            segtrain.run.train(compose_config([*overrides, "trainer.ckpt_every_steps=5"]), tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["state"]["step"] == 5
    assert [step for step, _ in read_scalars(tmp_path)["train/loss"]] == list(range(1, 8))
    segtrain.run.train(compose_config([*overrides, f"resume={tmp_path}"]), tmp_path / "unused")
    steps = [step for step, _ in read_scalars(tmp_path)["train/loss"]]
    assert steps == list(range(1, 13)), steps
    assert len(json.loads((tmp_path / "metrics.json").read_text())["history"]) == 3


def test_sigterm_to_train_py_then_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *TINY,
            "trainer.max_epochs=30", "dataset.train_samples=64", "dataset.size=48"]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run_dir / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert (run_dir / "last.pt").exists(), "the run never reached its first checkpoint"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert f"resume with: python train.py resume={run_dir / 'last.pt'}" in output
    stopped_at = load_checkpoint(run_dir / "last.pt")["state"]["step"]
    assert 0 < stopped_at < 30 * 8

    from conftest import run_train_py

    finished = run_train_py([f"hydra.run.dir={tmp_path / 'second'}", *TINY, "trainer.max_epochs=30",
                             "dataset.train_samples=64", "dataset.size=48", f"resume={run_dir}"])
    assert finished.returncode == 0, finished.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished"] and metrics["steps"] == 30 * 8 and metrics["epochs"] == 30


def test_kill_during_checkpoint_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.ones(3)})

    def dying_save(state, file):
        file.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # the process dies in the middle of writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temporary file left behind"


class Opaque:
    pass


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "extra": Opaque()}, path)
    with pytest.raises(ValueError, match="not a plain-data checkpoint"):
        load_checkpoint(path)


def test_checkpoint_of_another_class_count_fails_with_keys_and_shapes(tmp_path):
    segtrain.run.train(compose_config([*TINY, "trainer.max_epochs=1"]), tmp_path)
    cfg = compose_config([*TINY, "trainer.max_epochs=1", "dataset.num_classes=3", f"resume={tmp_path / 'best.pt'}"])
    # Resume refuses the changed key with both values, before building anything (issue 16) ...
    with pytest.raises(ConfigError, match=r"would change it mid-run: dataset.num_classes=3 \(the checkpoint: 4\)"):
        segtrain.run.train(cfg, tmp_path / "unused")
    # ... and weights that do not fit a model fail naming the keys and shapes.
    from segtrain.build import build_model
    from segtrain.checkpoint import load_weights

    model = build_model(OmegaConf.to_container(compose_config(TINY).model, resolve=True), 3)
    with pytest.raises(ValueError, match=r"different shapes: head.bias: checkpoint \(4,\) vs model \(3,\)"):
        load_weights(model, load_checkpoint(tmp_path / "best.pt"))


def test_eval_uses_the_checkpoints_config_and_refuses_other_overrides(tmp_path):
    """A focal-trained run evaluated without naming its loss: the val loss is focal's, as in training."""
    from conftest import run_train_py

    common = [*TINY, "trainer.max_epochs=1", "trainer.log_images=0"]
    segtrain.run.train(compose_config([*common, "loss=focal"]), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    evaluated = run_train_py([f"hydra.run.dir={tmp_path / 'log'}", *TINY, "mode=eval", f"resume={tmp_path / 'run'}"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"mode=eval: checkpoint {tmp_path / 'run' / 'best.pt'}" in evaluated.stdout + evaluated.stderr
    result = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())  # beside the checkpoint
    assert result["loss"] == pytest.approx(metrics["final"]["loss"], rel=1e-5)
    assert result["mIoU"] == pytest.approx(metrics["best_miou"], abs=1e-6)
    assert set(result["class_acc"]) == {"background", "ellipse", "rectangle", "triangle"}
    header = next(line for line in evaluated.stdout.splitlines() if line.startswith("class"))
    assert header.split() == ["class", "IoU", "Dice", "acc"]  # per-class pixel accuracy in the table
    refused = run_train_py([f"hydra.run.dir={tmp_path / 'log2'}", *TINY, "mode=eval", "loss=ce", "optimizer.lr=0.5",
                            f"resume={tmp_path / 'run'}"])
    output = refused.stdout + refused.stderr
    assert refused.returncode == 1 and "Traceback" not in output
    assert "these overrides would change what it computes: loss=ce (the checkpoint: focal)." in output
    # TINY's max_epochs=2 against the run's 1: a training setting, listed and ignored.
    log = (tmp_path / "log" / "train.log").read_text()
    assert "training settings on the command line are ignored (the checkpoint's apply): trainer.max_epochs=2 (the checkpoint: 1)" in log


def test_inference_overrides_apply_and_others_are_compared(tmp_path):
    stored = segtrain.run.OmegaConf.to_container(compose_config([*TINY, "loss=focal", "dataset.batch_size=4"]), resolve=True)
    cfg = compose_config([*TINY, "trainer.val_mode=slide", "trainer.window=16", "dataset.batch_size=2", "mode=eval"])
    run_cfg = segtrain.run.inference_config(cfg, stored, ["trainer.val_mode=slide", "trainer.window=16", "dataset.batch_size=2"])
    assert run_cfg.loss.name == "focal" and run_cfg.trainer.val_mode == "slide" and run_cfg.trainer.window == 16
    assert run_cfg.dataset.batch_size == 2 and run_cfg.mode == "eval"
    # An override equal to the checkpoint's value is no change; a group naming the checkpoint's option neither.
    same = compose_config([*TINY, "loss=focal", "mode=eval"])
    assert segtrain.run.inference_config(same, stored, ["loss=focal", "model.width=8"]).loss.name == "focal"
    with pytest.raises(segtrain.run.ConfigError, match=r"dataset.num_classes=3 \(the checkpoint: 4\)"):
        segtrain.run.inference_config(compose_config([*TINY, "dataset.num_classes=3"]), stored, ["dataset.num_classes=3"])


@LOSSES.register("test_nan_on_steps")
class NaNOnSteps(nn.Module):
    """Cross-entropy that returns NaN on chosen calls (1-based), to exercise the health guard."""

    sigmoid = False
    name = "test_nan_on_steps"

    def __init__(self, bad_calls: list[int], ignore_index=None):
        super().__init__()
        self.bad_calls, self.calls = set(bad_calls), 0

    def forward(self, logits, target):
        if self.training_call():
            self.calls += 1
        loss = nn.functional.cross_entropy(logits, target)
        return loss * float("nan") if self.calls in self.bad_calls and torch.is_grad_enabled() else loss

    def training_call(self):
        return torch.is_grad_enabled()


def nan_loss(bad_calls):
    return ["~loss", "+loss.name=test_nan_on_steps", f"+loss.bad_calls={bad_calls}"]


def test_non_finite_losses_skip_steps_and_the_run_finishes(tmp_path):
    segtrain.run.train(compose_config([*TINY, *nan_loss([2, 3, 7])]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 3 and metrics["steps"] == 12 - 3
    weights = load_checkpoint(tmp_path / "best.pt")["model"]
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())


def test_a_bad_micro_batch_skips_its_whole_optimizer_step(tmp_path, caplog):
    # 6 batches an epoch, 2 per optimizer step: the 3rd batch's NaN spoils step 2's accumulated gradients.
    with caplog.at_level("WARNING", logger="segtrain.trainer"):
        segtrain.run.train(compose_config([*TINY, *nan_loss([3]), "trainer.accumulate=2"]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 2 * 3 - 1
    assert "step 2: non-finite loss in test_nan_on_steps; step skipped (1 in a row)" in caplog.text
    weights = load_checkpoint(tmp_path / "last.pt")["model"]
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())


def test_too_many_non_finite_losses_in_a_row_stop_the_run(tmp_path):
    cfg = compose_config([*TINY, *nan_loss([3, 4, 5]), "trainer.max_bad_steps=3"])
    with pytest.raises(TrainingError, match="3 non-finite losses in a row .*trainer.max_bad_steps=3"):
        segtrain.run.train(cfg, tmp_path)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="bf16 autocast on the CPU needs oneDNN")
def test_bf16_autocast_on_the_cpu(tmp_path, monkeypatch):
    dtypes = []
    original = trainer_module.loss_terms

    def recording(loss_fn, outputs, masks):
        dtypes.append(outputs.dtype)
        return original(loss_fn, outputs, masks)

    monkeypatch.setattr(trainer_module, "loss_terms", recording)
    segtrain.run.train(compose_config([*TINY, "trainer.precision=bf16", "trainer.max_epochs=1"]), tmp_path)
    assert dtypes and all(dtype == torch.bfloat16 for dtype in dtypes)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["final"]["mIoU"] <= 1


def resident_megabytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc (Linux)")
def test_memory_stays_flat_over_hundreds_of_steps(tmp_path, monkeypatch):
    samples = {}
    original = trainer_module.Trainer.optimizer_step

    def measuring(self):
        norm = original(self)
        if self.state.step + 1 in (100, 400):  # the step counter goes up after optimizer_step returns
            samples[self.state.step + 1] = resident_megabytes()
        return norm

    monkeypatch.setattr(trainer_module.Trainer, "optimizer_step", measuring)
    overrides = [*TINY, "dataset.size=16", "dataset.batch_size=2", "dataset.train_samples=64", "model.width=4",
                 "trainer.max_steps=400", "trainer.max_epochs=1000", "trainer.val_every=1000"]
    segtrain.run.train(compose_config(overrides), tmp_path)
    assert samples[400] - samples[100] < 20, f"RSS grew from {samples[100]:.1f} MB to {samples[400]:.1f} MB"


def test_eval_prints_per_class_table_matching_training(tmp_path, capsys):
    segtrain.run.train(compose_config([*TINY, "trainer.max_epochs=2"]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    best = next(entry for entry in metrics["history"] if entry["epoch"] == metrics["best_epoch"])
    result = segtrain.run.main(compose_config([*TINY, "mode=eval", f"resume={tmp_path / 'best.pt'}"]), tmp_path / "eval")
    table = capsys.readouterr().out
    assert "class" in table and "IoU" in table and "triangle" in table and "pixel acc" in table
    evaluation = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result == pytest.approx(best["mIoU"]) and evaluation["IoU"] == pytest.approx(best["IoU"], nan_ok=True)


def test_init_from_strict_and_partial(tmp_path, caplog):
    caplog.set_level("INFO")
    segtrain.run.train(compose_config([*TINY, "trainer.max_epochs=1"]), tmp_path / "source")
    source = load_checkpoint(tmp_path / "source" / "best.pt")["model"]
    from segtrain.build import build

    components, _ = build(compose_config([*TINY, f"+model.init_from={tmp_path / 'source' / 'best.pt'}"]))
    assert_same_weights(source, components.model.state_dict())
    with pytest.raises(ValueError, match="different shapes: head"):
        build(compose_config([*TINY, "dataset.num_classes=3", f"+model.init_from={tmp_path / 'source' / 'best.pt'}"]))
    components, _ = build(compose_config([*TINY, "dataset.num_classes=3", f"+model.init_from={tmp_path / 'source' / 'best.pt'}",
                                          "+model.init_strict=false"]))
    assert torch.equal(components.model.encoder[0][0].weight, source["encoder.0.0.weight"])
    assert "not loaded: head.bias, head.weight" in caplog.text


def test_gradient_accumulation_matches_the_large_batch():
    from segtrain.build import build

    # Unweighted CE: with class weights a mean divides by each micro-batch's summed weights, so
    # the mean of two micro-batch means is close to, not equal to, the large batch's (docs/losses.md).
    common = [*TINY, "model.norm=group", "trainer.max_steps=1", "optimizer=sgd", "dataset.train_samples=16", "loss.weight=null"]
    large, _ = build(compose_config([*common, "dataset.batch_size=8"]))
    small, _ = build(compose_config([*common, "dataset.batch_size=4", "trainer.accumulate=2"]))
    small.model.load_state_dict(large.model.state_dict())
    for components, accumulate in ((large, 1), (small, 2)):
        settings = trainer_module.TrainerSettings(max_steps=1, accumulate=accumulate, progress_bar=False, save_checkpoints=False)
        run_log = type("NoLog", (), {"scalars": lambda *a: None, "flush": lambda *a: None, "write_metrics": lambda *a: None})()
        trainer = trainer_module.Trainer(components, settings, run_log, "/nonexistent", {})
        trainer.train_one_epoch({})
    for (name, first), second in zip(large.model.named_parameters(), small.model.parameters()):
        assert torch.allclose(first, second, atol=1e-6), name


def test_predict_writes_masks_and_overlays_of_the_input_size(tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import run_train_py
    from segtrain.build import build
    from segtrain.registry import DATASETS
    from segtrain.task import classes_from_logits
    from segtrain.visualize import resolve_palette

    segtrain.run.train(compose_config([*TINY, "trainer.max_epochs=1"]), tmp_path / "run")
    images = tmp_path / "images"
    images.mkdir()
    shapes = DATASETS.get("shapes")("val", size=[40, 56], val_samples=3)
    for index, name in enumerate(["a.png", "b.png", "c.jpg"]):
        image = (shapes[index][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        if index == 2:
            image = image[:30, :50]  # another size
        Image.fromarray(image).save(images / name, quality=100)
    process = run_train_py([f"hydra.run.dir={tmp_path / 'predict'}", *TINY, "mode=predict",
                            f"resume={tmp_path / 'run' / 'best.pt'}", f"predict.input={images}"])
    assert process.returncode == 0, process.stderr[-3000:]

    components, _ = build(compose_config([*TINY, f"+model.init_from={tmp_path / 'run' / 'best.pt'}"]))
    model = components.model.eval()
    for name, size in (("a", (40, 56)), ("b", (40, 56)), ("c", (30, 50))):
        written = Image.open(tmp_path / "run" / "predictions" / f"{name}.png")  # beside the checkpoint
        # A palette PNG: the values are the class indices, a viewer shows the dataset's colours (VOC convention).
        assert written.mode == "P"
        palette = np.array(written.getpalette()[: 3 * 4]).reshape(4, 3)
        assert (palette == resolve_palette(None, components.val_loader.dataset, 4)).all()
        mask = np.array(written)
        overlay = Image.open(tmp_path / "run" / "predictions" / f"{name}_overlay.png")
        assert mask.shape == size and overlay.size == (size[1], size[0]) and overlay.mode == "RGB"
        source = np.array(Image.open(next(images.glob(f"{name}.*"))).convert("RGB"))
        with torch.no_grad():
            expected = classes_from_logits(model(torch.from_numpy(source).permute(2, 0, 1)[None].float() / 255))[0].numpy()
        assert (mask == expected).all(), "the written mask is the model's prediction"
