"""Running out of memory ends the run with segtrain's one-line message naming the batch size and
precision to change, not a traceback. The CPU allocator's failure is real here (a model asks for
40 TB); CUDA's ``torch.OutOfMemoryError`` is raised by a stand-in model (its real counterpart is
in tests/test_cuda.py's territory: an absurd batch on a GPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import segtrain.run
from conftest import TINY, compose_config
from segtrain.registry import MODELS
from segtrain.errors import TrainingError


class Hungry(nn.Module):
    """A 1x1 convolution that runs out of memory in training (``kind``: how) and works in eval."""

    def __init__(self, in_channels: int = 3, out_channels: int = 4, kind: str = "cpu", **ignored) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        self.kind = kind

    def forward(self, images):
        if self.training:
            if self.kind == "cpu":
                torch.empty(10**13, dtype=torch.uint8)  # the CPU allocator refuses 10 TB
            else:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return self.conv(images)


if "test_hungry" not in MODELS:
    MODELS.register("test_hungry")(Hungry)


@pytest.mark.parametrize("kind, where", [("cpu", "host (CPU) out of memory"), ("cuda", "host (CPU) out of memory")])
def test_out_of_memory_names_the_batch_size_and_precision(tmp_path, kind, where):
    # On this CPU run a torch.OutOfMemoryError is reported as host memory too (the device is the CPU).
    cfg = compose_config([*TINY, "model.name=test_hungry", f"+model.kind={kind}", "trainer.log_images=0"])
    with pytest.raises(TrainingError) as error:
        segtrain.run.train(cfg, tmp_path)
    message = str(error.value)
    assert message.startswith(f"{where} at epoch 1, step 1 with dataset.batch_size=8 and trainer.precision=32")
    assert "dataset.batch_size=4" in message and "trainer.accumulate=2" in message and "trainer.precision=bf16" in message
    assert "\n" not in message


def test_other_runtime_errors_pass_through(tmp_path, monkeypatch):
    def broken(self, images):
        raise RuntimeError("something else")

    monkeypatch.setattr(Hungry, "forward", broken)
    cfg = compose_config([*TINY, "model.name=test_hungry", "trainer.log_images=0"])
    with pytest.raises(RuntimeError, match="something else"):
        segtrain.run.train(cfg, tmp_path)
