"""Datasets. Importing this package registers them in ``DATASETS``."""
from segtrain.datasets import torchvision_sets  # noqa: F401  (registers voc, pets, cityscapes)
from segtrain.datasets.folder import SegmentationFiles
from segtrain.datasets.shapes import Shapes

__all__ = ["SegmentationFiles", "Shapes"]
