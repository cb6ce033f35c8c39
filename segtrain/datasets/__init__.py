"""Datasets. Importing this package registers them in ``DATASETS``."""
from segtrain.datasets.shapes import Shapes

__all__ = ["Shapes"]
