"""torchvision's segmentation models: FCN, DeepLabV3 and LR-ASPP, with offline weights.

Random initialisation by default. ``weights`` / ``weights_backbone`` take a torchvision
weights name (``DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1``, or just
``COCO_WITH_VOC_LABELS_V1`` / ``DEFAULT``) or a local file. Nothing is ever downloaded:
a named weight must already be in the torch hub cache, else the error says where to put
the file. Layers whose shape differs from the file (the class layers when
``num_classes`` differs) keep their random initialisation.

In train mode a model with an auxiliary head (``aux_loss``) returns ``{"out": logits,
"aux": aux_logits}``; in eval mode it returns the logits only. The aux term's weight is the
loss side's (``losses.AuxiliaryHeadLoss``, weight ``model.aux_weight``): the model carries none.

torchvision is imported inside the functions: importing it costs about 2 s, which every
``train.py`` start would pay, also with models that do not use it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from segtrain.checkpoint import weights_in
from segtrain.errors import ConfigError
from segtrain.registry import MODELS

log = logging.getLogger(__name__)


class TorchvisionSegmentation(nn.Module):
    """A torchvision segmentation model returning logits (eval) or ``{"out", "aux"}`` (train, with an aux head)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        output = self.model(images)
        if self.training and "aux" in output:
            return {"out": output["out"], "aux": output["aux"]}
        return output["out"]


def weights_file(name: str, builder: str, key: str) -> Path:
    """The torch hub cache file of torchvision weights ``name``; raises if it is not there."""
    import torchvision.models

    try:
        weights = torchvision.models.get_weight(name) if "." in name else torchvision.models.get_model_weights(builder)[name]
    except (KeyError, ValueError, AttributeError):
        known = ", ".join(w.name for w in torchvision.models.get_model_weights(builder))
        raise ConfigError(f"{key}={name}: not a torchvision weights name for {builder} ({known}) nor an existing file") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not path.is_file():
        raise ConfigError(
            f"{key}={name}: weights are never downloaded at run time and {path} is missing. Put the file there "
            f"(download {weights.url} on a machine with internet access), or set {key} to a local file"
        )
    return path


def load_weights(module: nn.Module, value: str, builder: str, key: str, strip: tuple[str, ...] = ()) -> None:
    """Load a state dict (weights name or file) into ``module``; entries whose shape differs are skipped and logged."""
    path = Path(value) if Path(value).is_file() else weights_file(value, builder, key)
    state = weights_in(torch.load(path, map_location="cpu", weights_only=True))  # a torchvision file or a segtrain checkpoint
    for prefix in strip:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"{key}={value}: no entry of {path} fits the model (is it the right architecture?)")
    module.load_state_dict(usable, strict=False)
    skipped = sorted(set(state) - set(usable))
    log.info("%s: loaded %d of %d tensors from %s%s", key, len(usable), len(own), path,
             f"; not loaded (absent or other shape): {', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''}" if skipped else "")


def adapt_first_conv(backbone: nn.Module, in_channels: int) -> None:
    """Replace the backbone's first 3-channel convolution by one with ``in_channels`` inputs.

    Its weights become the mean over the RGB filters, repeated and scaled by ``3 / in_channels``
    (as timm does), so pretrained filters keep their response to a gray image.
    """
    if in_channels < 1:
        raise ConfigError(f"model.in_channels={in_channels}: needs at least one input channel")
    for parent in backbone.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                conv = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, child.groups, child.bias is not None)
                with torch.no_grad():
                    conv.weight.copy_(child.weight.mean(1, keepdim=True).repeat(1, in_channels, 1, 1) * 3 / in_channels)
                    if child.bias is not None:
                        conv.bias.copy_(child.bias)
                setattr(parent, name, conv)
                return
    raise ConfigError(f"model.in_channels={in_channels}: found no 3-channel first convolution to adapt in this backbone")


def build(
    builder_name: str,
    backbone_builder: str,
    in_channels: int,
    out_channels: int,
    weights: str | None,
    weights_backbone: str | None,
    aux_loss: bool,
) -> TorchvisionSegmentation:
    # weights_backbone=None explicitly: torchvision's default would download ImageNet weights.
    from torchvision.models import segmentation

    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": out_channels}
    if aux_loss:
        kwargs["aux_loss"] = True
    model = getattr(segmentation, builder_name)(**kwargs)
    if weights is not None:
        load_weights(model, str(weights), builder_name, "model.weights", strip=("model.",))
    elif weights_backbone is not None:
        # torchvision keeps mobilenet's `features` as the backbone, so its keys lose that prefix.
        load_weights(model.backbone, str(weights_backbone), backbone_builder, "model.weights_backbone", strip=("features.",))
    if in_channels != 3:
        adapt_first_conv(model.backbone, int(in_channels))
    return TorchvisionSegmentation(model)


@MODELS.register("fcn_resnet50")
def fcn_resnet50(in_channels: int, out_channels: int, weights: str | None = None, weights_backbone: str | None = None,
                 aux_loss: bool = True) -> TorchvisionSegmentation:
    """FCN with a ResNet-50 backbone (output stride 8)."""
    return build("fcn_resnet50", "resnet50", in_channels, out_channels, weights, weights_backbone, aux_loss)


@MODELS.register("deeplabv3_resnet50")
def deeplabv3_resnet50(in_channels: int, out_channels: int, weights: str | None = None, weights_backbone: str | None = None,
                       aux_loss: bool = True) -> TorchvisionSegmentation:
    """DeepLabV3 (ASPP head) with a ResNet-50 backbone (output stride 8)."""
    return build("deeplabv3_resnet50", "resnet50", in_channels, out_channels, weights, weights_backbone, aux_loss)


@MODELS.register("deeplabv3_mobilenet_v3_large")
def deeplabv3_mobilenet_v3_large(in_channels: int, out_channels: int, weights: str | None = None, weights_backbone: str | None = None,
                                 aux_loss: bool = True) -> TorchvisionSegmentation:
    """DeepLabV3 with a MobileNetV3-Large backbone (output stride 16)."""
    return build("deeplabv3_mobilenet_v3_large", "mobilenet_v3_large", in_channels, out_channels, weights,
                 weights_backbone, aux_loss)


@MODELS.register("lraspp_mobilenet_v3_large")
def lraspp_mobilenet_v3_large(in_channels: int, out_channels: int, weights: str | None = None,
                              weights_backbone: str | None = None) -> TorchvisionSegmentation:
    """Lite R-ASPP with a MobileNetV3-Large backbone; no auxiliary head."""
    return build("lraspp_mobilenet_v3_large", "mobilenet_v3_large", in_channels, out_channels, weights,
                 weights_backbone, False)
