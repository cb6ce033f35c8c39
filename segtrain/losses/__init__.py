"""Segmentation losses, registered in ``segtrain.registry.LOSSES`` when this package is imported.

Every loss is called as ``loss(logits, target)`` with logits ``(N, C, *spatial)`` and an
integer mask ``(N, *spatial)`` or ``(N, 1, *spatial)``; the target is checked and
converted in one place (:func:`segtrain.losses.target.prepare_target`), and pixels equal
to ``ignore_index`` are left out of every loss. Each loss has a bool ``sigmoid``: the
framework gives the model ``1 if loss.sigmoid and num_classes == 2 else num_classes``
output channels.
"""
from segtrain.losses import classification, combined, dice, focal, regression  # noqa: F401  (registration)
from segtrain.losses.base import SegLoss
from segtrain.errors import LossParamError
from segtrain.losses.build import AUTO_PARAMS, build_loss, loss_terms, resolve_auto, with_ignore_index
from segtrain.losses.combined import AuxiliaryHeadLoss
from segtrain.losses.focal import softmax_focal_loss
from segtrain.losses.target import PreparedTarget, prepare_target

__all__ = [
    "AUTO_PARAMS",
    "AuxiliaryHeadLoss",
    "LossParamError",
    "PreparedTarget",
    "SegLoss",
    "build_loss",
    "loss_terms",
    "prepare_target",
    "resolve_auto",
    "softmax_focal_loss",
    "with_ignore_index",
]
