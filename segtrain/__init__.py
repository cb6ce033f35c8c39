"""segtrain: config-driven training of semantic-segmentation networks.

Importing the package registers every built-in model, dataset and loss.
"""
from segtrain import datasets, losses, models  # noqa: F401  (imported for registration)
from segtrain.registry import DATASETS, LOSSES, MODELS

__version__ = "0.1.0"
__all__ = ["DATASETS", "LOSSES", "MODELS"]
