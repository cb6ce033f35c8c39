"""Segmentation models. Importing this package registers them in ``MODELS``."""
from segtrain.models import smp_models, torchvision_models  # noqa: F401  (registers smp; fcn / deeplabv3 / lraspp)
from segtrain.models.unet import UNet

__all__ = ["UNet"]
