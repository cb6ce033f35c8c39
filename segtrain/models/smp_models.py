"""``model=smp``: segmentation_models_pytorch architectures with its timm/torchvision encoders
(optional extra: ``pip install -e '.[smp]'``).

Nothing is downloaded: the encoder starts from random weights (``model.encoder_weights: null``)
or from a local file of its state dict (``model.encoder_weights: path/to/encoder.pth``, e.g. a
timm or torchvision checkpoint of the same backbone saved on a machine with internet access).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.torchvision_models import load_weights
from segtrain.registry import MODELS


@MODELS.register("smp")
def smp_model(
    out_channels: int, arch: str = "Unet", encoder: str = "resnet18", encoder_weights: str | None = None,
    in_channels: int = 3, **ignored: object,
) -> nn.Module:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise ConfigError("model=smp needs segmentation_models_pytorch: pip install -e '.[smp]'") from None
    architectures = sorted(name for name in dir(smp) if isinstance(getattr(smp, name), type) and issubclass(getattr(smp, name), nn.Module))
    if arch not in architectures:
        raise ConfigError(f"model.arch={arch}: not a segmentation_models_pytorch architecture; known: {', '.join(architectures)}")
    if encoder not in smp.encoders.get_encoder_names():
        raise ConfigError(f"model.encoder={encoder}: unknown to segmentation_models_pytorch; see smp.encoders.get_encoder_names()")
    model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, in_channels=int(in_channels), classes=out_channels)
    if encoder_weights:
        if not Path(encoder_weights).is_file():
            raise ConfigError(
                f"model.encoder_weights={encoder_weights}: no such file; weights are never downloaded at run time: "
                f"save the {encoder} encoder's state dict on a machine with internet access and give its path, or null"
            )
        load_weights(model.encoder, encoder_weights, encoder, "model.encoder_weights")
    return model
