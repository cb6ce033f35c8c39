"""Segmentation models. Importing this package registers them in ``MODELS``."""
from segtrain.models.unet import UNet

__all__ = ["UNet"]
