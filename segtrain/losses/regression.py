"""Regression losses between the activated prediction and the one-hot target: mse, l1, smooth_l1, huber."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segtrain.losses.base import SegLoss, check_activation, reduce_channels, register_loss
from segtrain.errors import LossParamError
from segtrain.losses.target import PreparedTarget


def hard_negative_mask(pixel_loss: Tensor, index: Tensor, valid: Tensor | None, ratio: float) -> Tensor:
    """Counted pixels under hard negative mining, per sample: every positive (class != 0)
    and the ``ratio x positives`` negatives (class 0) with the highest loss.

    A sample with no positive pixel keeps no negative, so it adds nothing (as in SSD's
    mining); a batch without positives therefore has loss 0. Sorting per sample avoids
    a host sync for the number of negatives to keep.
    """
    batch = pixel_loss.shape[0]
    scores = pixel_loss.detach().reshape(batch, -1)
    labels = index.reshape(batch, -1)
    counted = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.reshape(batch, -1)
    positive = (labels != 0) & counted
    negative = (labels == 0) & counted
    keep = torch.floor(positive.sum(1).to(scores.dtype) * ratio).unsqueeze(1)
    order = scores.masked_fill(~negative, float("-inf")).argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (positive | (negative & (rank < keep))).reshape(index.shape)


class OneHotRegressionLoss(SegLoss):
    """Base for element-wise regression on ``activation(logits)`` against the one-hot target.

    ``mean`` runs over all elements of the counted pixels (equal to torch's loss on the
    activated prediction and one-hot target when nothing is ignored), ``sum`` sums them,
    ``none`` gives the per-pixel mean over the C channels. ``hnm_ratio > 0`` turns on
    hard negative mining (:func:`hard_negative_mask`).
    """

    def __init__(
        self, activation: str = "softmax", hnm_ratio: float = 0.0, ignore_index: int | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__(ignore_index, reduction)
        self.activation = check_activation(activation)
        if isinstance(hnm_ratio, bool) or not isinstance(hnm_ratio, (int, float)) or hnm_ratio < 0:
            raise LossParamError("loss.hnm_ratio", f"{hnm_ratio!r} must be a number >= 0 (0 turns mining off)")
        self.hnm_ratio = float(hnm_ratio)
        self.sigmoid = activation == "sigmoid"
        self.softmax = activation == "softmax"

    @classmethod
    def uses_sigmoid(cls, params: dict[str, Any]) -> bool:
        return params.get("activation", "softmax") == "sigmoid"

    def elements(self, prediction: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement elements()")

    def compute(self, logits: Tensor, target: PreparedTarget) -> Tensor:
        if self.activation == "softmax":
            prediction = torch.softmax(logits, 1)
        elif self.activation == "sigmoid":
            prediction = torch.sigmoid(logits)
        else:
            prediction = logits
        elements = self.elements(prediction, target.dense(prediction.dtype))
        if self.hnm_ratio == 0:
            return reduce_channels(elements, target.valid, self.reduction, target.num_counted)
        counted = hard_negative_mask(elements.mean(1), target.index, target.valid, self.hnm_ratio)
        return reduce_channels(elements, counted, self.reduction, counted.sum())

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, hnm_ratio={self.hnm_ratio}, " + super().extra_repr()


@register_loss("mse")
class MSELoss(OneHotRegressionLoss):
    """Mean squared error between the activated prediction and the one-hot target (the classic ``loss_seg``)."""

    def elements(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target, reduction="none")


@register_loss("l1")
class L1Loss(OneHotRegressionLoss):
    """Absolute error between the activated prediction and the one-hot target."""

    def elements(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.l1_loss(prediction, target, reduction="none")


@register_loss("smooth_l1")
class SmoothL1Loss(OneHotRegressionLoss):
    """``torch.nn.SmoothL1Loss`` (quadratic below ``beta``) against the one-hot target."""

    def __init__(
        self,
        beta: float = 1.0,
        activation: str = "softmax",
        hnm_ratio: float = 0.0,
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(activation, hnm_ratio, ignore_index, reduction)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
            raise LossParamError("loss.beta", f"{beta!r} must be a number >= 0")
        self.beta = float(beta)

    def elements(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.smooth_l1_loss(prediction, target, reduction="none", beta=self.beta)


@register_loss("huber")
class HuberLoss(OneHotRegressionLoss):
    """``torch.nn.HuberLoss`` (quadratic below ``delta``, then linear with slope ``delta``) against the one-hot target."""

    def __init__(
        self,
        delta: float = 1.0,
        activation: str = "softmax",
        hnm_ratio: float = 0.0,
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(activation, hnm_ratio, ignore_index, reduction)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or delta <= 0:
            raise LossParamError("loss.delta", f"{delta!r} must be a number > 0")
        self.delta = float(delta)

    def elements(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.huber_loss(prediction, target, reduction="none", delta=self.delta)
