import pytest
import torch

from segtrain.models.unet import UNet
from segtrain.registry import MODELS


# Small settings per model, so that every registered model runs on the CPU in a moment.
SMALL = {"unet": {"width": 4, "depth": 2}}


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_runs_forward_and_backward(name):
    model = MODELS.get(name)(in_channels=3, out_channels=4, **SMALL.get(name, {}))
    output = model(torch.randn(2, 3, 40, 56))
    logits = output["out"] if isinstance(output, dict) else output  # models with an aux head: a dict in train mode
    assert logits.shape == (2, 4, 40, 56)
    logits.sum().backward()
    used = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert used, "gradients reach the parameters"


@pytest.mark.parametrize("size", [(16, 16), (17, 31), (33, 20), (8, 9)])
@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_unet_2d_any_size_same_output_size(size, norm):
    model = UNet(1, 3, dims=2, width=8, depth=3, norm=norm).eval()
    if norm == "instance" and size == (8, 9):
        with pytest.raises(ValueError, match="instance normalisation has no statistics"):
            model(torch.randn(1, 1, *size))
        return
    assert model(torch.randn(1, 1, *size)).shape == (1, 3, *size)


@pytest.mark.parametrize("size", [(8, 8, 8), (9, 13, 10)])
def test_unet_3d_any_size(size):
    model = UNet(2, 4, dims=3, width=4, depth=2, norm="group")
    assert model(torch.randn(2, 2, *size)).shape == (2, 4, *size)


def test_width_and_depth_set_the_channels():
    model = UNet(3, 2, width=6, depth=4)
    assert model.encoder[-1][0].out_channels == 6 * 2**4
    assert len(model.decoder) == 4


def test_clear_errors():
    with pytest.raises(ValueError, match="model.norm=layer"):
        UNet(3, 2, norm="layer")
    with pytest.raises(ValueError, match="model.dims=4"):
        UNet(3, 2, dims=4)
    with pytest.raises(ValueError, match="too small for model.depth=3"):
        UNet(3, 2, depth=3)(torch.randn(1, 3, 4, 64))
    with pytest.raises(ValueError, match="model.dims=2 expects input"):
        UNet(3, 2)(torch.randn(1, 3, 8, 8, 8))
