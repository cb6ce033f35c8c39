"""The training step is GPU-first: nothing reads a device value back to the host between forward
and backward, and at most one read lands per optimizer step outside logging steps.

A read (``.item()``, ``.tolist()``, ``if tensor``, ``float(tensor)``, ...) stalls a CUDA step until
the GPU has caught up. The test wraps those Tensor methods around a few real steps of the trainer
(``segtrain.run.train`` on the composed config) and records them in order with the forward, backward
and optimizer-step calls. Reads inside the data loader (the CPU mask check, before the transfer),
inside ``optimizer.step`` (torch's own, on CPU step counters) and in validation are not counted.
On CUDA the same run also runs under ``torch.cuda.set_sync_debug_mode("warn")``, whose warnings are
recorded in the same order: that catches any synchronising call, not only these methods.
"""
from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch
from torch.utils.data.dataloader import _BaseDataLoaderIter

import segtrain.run
import segtrain.trainer
from conftest import TINY, compose_config

# The recorder wraps optimizer.step after the scheduler was built; torch's scheduler notices and warns.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


class StepRecorder:
    """Events in call order: ("forward" | "backward" | "step", None), ("read", method name) and, on
    CUDA, ("sync", warning text) for each synchronising call torch's sync debug mode reports."""

    def __init__(self, cuda: bool) -> None:
        self.events: list[tuple[str, str | None]] = []
        self.paused = 0
        self.cuda = cuda

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        recorder = self
        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(self, *args, _original=original, _name=name, **kwargs):
                if not recorder.paused:
                    recorder.events.append(("read", _name))
                with recorder.pause():  # a read's own internals (tolist calling item) count once
                    return _original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, read)

        original_backward = torch.Tensor.backward

        def backward(self, *args, **kwargs):
            recorder.events.append(("backward", None))
            return original_backward(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "backward", backward)
        original_next = _BaseDataLoaderIter.__next__

        def loader_next(self):
            with recorder.pause():
                return original_next(self)

        monkeypatch.setattr(_BaseDataLoaderIter, "__next__", loader_next)
        original_validate = segtrain.trainer.Trainer.validate

        def validate(trainer, epoch, **kwargs):
            with recorder.pause():
                return original_validate(trainer, epoch, **kwargs)

        monkeypatch.setattr(segtrain.trainer.Trainer, "validate", validate)
        original_make_trainer = segtrain.run.make_trainer

        def make_trainer(*args, **kwargs):
            trainer = original_make_trainer(*args, **kwargs)
            model, optimizer = trainer.forward_model, trainer.optimizer
            model_forward, optimizer_step = model.forward, optimizer.step

            def forward(*f_args, **f_kwargs):
                if model.training:
                    recorder.events.append(("forward", None))
                return model_forward(*f_args, **f_kwargs)

            def step(*s_args, **s_kwargs):
                recorder.events.append(("step", None))
                with recorder.pause():
                    return optimizer_step(*s_args, **s_kwargs)

            model.forward, optimizer.step = forward, step
            return trainer

        monkeypatch.setattr(segtrain.run, "make_trainer", make_trainer)
        if self.cuda:
            original_show = warnings.showwarning

            def show(message, category, *args, **kwargs):
                if "synchroniz" in str(message):
                    if not recorder.paused:
                        recorder.events.append(("sync", str(message)[:200]))
                    return None
                return original_show(message, category, *args, **kwargs)

            monkeypatch.setattr(warnings, "showwarning", show)

    def syncs_between_forward_and_backward(self) -> list[str]:
        inside, found = False, []
        for kind, name in self.events:
            inside = True if kind == "forward" else False if kind == "backward" else inside
            if kind == "sync" and inside:
                found.append(name)
        return found

    def syncs_per_optimizer_step(self) -> list[int]:
        counts: list[int] = []
        current: int | None = None
        for kind, _ in self.events:
            if kind == "forward" and current is None:
                current = 0
            elif kind == "sync" and current is not None:
                current += 1
            elif kind == "step":
                counts.append(current or 0)
                current = 0
        return counts

    def reads_between_forward_and_backward(self) -> list[str]:
        reads, inside = [], False
        for kind, name in self.events:
            if kind == "forward":
                inside = True
            elif kind == "backward":
                inside = False
            elif kind == "read" and inside:
                reads.append(name)
        return reads

    def reads_per_optimizer_step(self) -> list[list[str]]:
        """The reads from one optimizer step to the next (the first from the first forward on)."""
        steps: list[list[str]] = []
        current: list[str] | None = None
        for kind, name in self.events:
            if kind == "forward" and current is None:
                current = []
            elif kind == "read" and current is not None:
                current.append(name)
            elif kind == "step":
                steps.append(current or [])
                current = []
        return steps


CASES = {
    "ce": [],
    "focal with ignore index": ["loss=focal", "dataset.ignore_index=255"],
    "ce + dice, 2 micro-batches a step": ["loss=ce_dice", "trainer.accumulate=2"],
    "bce (sigmoid)": ["loss=bce"],
    "mse, bf16 autocast": ["loss=mse", "trainer.precision=bf16"],
    "focal, clip_grad_norm": ["loss=focal", "trainer.clip_grad_norm=1.0"],
}


def run_recorded(tmp_path, monkeypatch, overrides: list[str], cuda: bool = False) -> StepRecorder:
    recorder = StepRecorder(cuda)
    recorder.install(monkeypatch)
    # No logging step (log_every beyond the run), no pictures: only the training steps' own reads.
    common = [*TINY, "trainer.max_epochs=1", "trainer.log_every=1000", "trainer.log_images=0"]
    if not cuda:
        segtrain.run.train(compose_config([*common, *overrides]), tmp_path)
        return recorder
    common = [arg for arg in common if not arg.startswith("device_list=")]
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every sync is reported, not only the first at each line
        torch.cuda.set_sync_debug_mode("warn")
        try:
            segtrain.run.train(compose_config([*common, "device_list=[0]", *overrides]), tmp_path)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return recorder


@pytest.mark.parametrize("case", CASES)
def test_no_host_read_between_forward_and_backward_and_one_per_step(case, tmp_path, monkeypatch):
    recorder = run_recorded(tmp_path, monkeypatch, CASES[case])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    steps = recorder.reads_per_optimizer_step()
    assert metrics["steps"] == len(steps) > 0
    assert recorder.events.count(("forward", None)) == recorder.events.count(("backward", None)) == 48 // 8
    assert recorder.reads_between_forward_and_backward() == []
    assert all(len(reads) <= 1 for reads in steps), steps
    assert any(steps), "the finiteness check after backward should be the one read per step"


def test_a_logging_step_reads_its_values_at_once(tmp_path, monkeypatch):
    recorder = run_recorded(tmp_path, monkeypatch, ["loss=ce_dice", "trainer.log_every=2"])
    steps = recorder.reads_per_optimizer_step()
    # The reads after step k belong to the next window: steps 2, 4, 6 log (one stacked tolist each).
    assert recorder.reads_between_forward_and_backward() == []
    assert [len(reads) for reads in steps] == [1, 1, 2, 1, 2, 1]


def test_the_counting_sees_a_read_between_forward_and_backward(tmp_path, monkeypatch):
    """The check itself can fail: a loss that reads its value back is caught."""
    original = segtrain.trainer.loss_terms

    def reading_loss(*args, **kwargs):
        loss, terms = original(*args, **kwargs)
        if not torch.isfinite(loss):  # what the step did before backward until this check moved after it
            pass
        return loss, terms

    monkeypatch.setattr(segtrain.trainer, "loss_terms", reading_loss)
    recorder = run_recorded(tmp_path, monkeypatch, [])
    assert recorder.reads_between_forward_and_backward() == ["__bool__"] * (48 // 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the sync debug mode checks the CUDA step")
@pytest.mark.parametrize("case", CASES)
def test_cuda_step_has_no_sync_between_forward_and_backward(case, tmp_path, monkeypatch):
    recorder = run_recorded(tmp_path, monkeypatch, CASES[case], cuda=True)
    assert recorder.reads_between_forward_and_backward() == []
    assert recorder.syncs_between_forward_and_backward() == []
    assert all(len(reads) <= 1 for reads in recorder.reads_per_optimizer_step())
    syncs = recorder.syncs_per_optimizer_step()
    assert len(syncs) == json.loads((tmp_path / "metrics.json").read_text())["steps"]
    assert all(count <= 1 for count in syncs), (syncs, [event for event in recorder.events if event[0] == "sync"][:5])

