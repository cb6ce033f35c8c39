"""Focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` (Lin et al. 2017), softmax and sigmoid forms."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segtrain.errors import LossParamError
from segtrain.losses.base import (
    SegLoss,
    check_length,
    class_vector,
    reduce_channels,
    reduce_pixels,
    register_loss,
)
from segtrain.losses.target import PreparedTarget


def softmax_focal_loss(
    logits: Tensor, target: Tensor, gamma: float, alpha_t: Tensor | None = None, ignore_index: int | None = None
) -> Tensor:
    """Per-pixel softmax focal loss ``-alpha_t (1 - p_t)^gamma log p_t``, ``(N, *spatial)``.

    ``target`` holds classes in ``[0, C)`` or ``ignore_index``, where loss and gradient are 0;
    ``alpha_t`` is the alpha of each pixel's target class. Plain PyTorch ops, the same on
    every device, under autocast and ``torch.compile``: ``-log p_t`` is the per-pixel
    cross-entropy (0 at ignored pixels, so the focal term is 0 there too), and the focal
    factor is a few per-pixel ops on it. Half-precision logits are computed in float32,
    as autocast does for cross-entropy.
    """
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    ce = F.cross_entropy(x, target, ignore_index=-100 if ignore_index is None else ignore_index, reduction="none")
    if gamma == 0:
        loss = ce
    else:
        p_t_minus_1 = torch.expm1(-ce)  # -(1 - p_t), accurate where p_t is near 1
        if gamma == 2:  # the default: a square, no pow
            modulator = p_t_minus_1.square()
        else:
            one_minus_p_t = p_t_minus_1.neg()
            if gamma < 1:
                # d/du u^g = g u^(g-1) is infinite at u = 0 for g < 1, and 0 * inf = NaN on saturated
                # logits (torchvision's form); u clamped to the smallest normal float keeps the gradient
                # finite (0 below it) and changes the loss by at most tiny^g * (-log p_t) < tiny^g * tiny.
                one_minus_p_t = one_minus_p_t.clamp_min(torch.finfo(x.dtype).tiny)
            modulator = one_minus_p_t.pow(gamma)
        loss = ce * modulator
    return loss if alpha_t is None else loss * alpha_t


def sigmoid_focal_elements(logits: Tensor, dense: Tensor, gamma: float, alpha: Tensor | float | None) -> Tensor:
    """Element-wise sigmoid focal loss, the values of ``torchvision.ops.sigmoid_focal_loss``.

    Written with ``logsigmoid`` of the signed logit: ``(1 - p_t)^g = exp(g logsigmoid(-z))``
    has a finite gradient everywhere, where torchvision's ``(1 - p_t) ** g`` gives NaN
    for ``g < 1`` once ``p_t`` rounds to 1.
    """
    signed = logits * (2.0 * dense - 1.0)  # z with p_t = sigmoid(z)
    loss = -F.logsigmoid(signed)
    if gamma != 0:
        loss = loss * torch.exp(gamma * F.logsigmoid(-signed))
    if alpha is not None:
        loss = loss * (alpha * dense + (1.0 - alpha) * (1.0 - dense))
    return loss


@register_loss("focal")
class FocalLoss(SegLoss):
    """Focal loss ``-alpha_t (1 - p_t)^gamma log p_t``.

    ``activation=softmax`` (multi-class): computed from the per-pixel cross-entropy
    (:func:`softmax_focal_loss`, plain PyTorch ops); ``alpha`` is null, a scalar multiplier, or one
    float per class (``auto``: median-frequency weights); with ``gamma=0`` and no
    alpha it equals cross-entropy. ``activation=sigmoid``: binary (1 channel, target
    == 1 positive) or multi-label (C channels, one-hot); per element it equals
    ``torchvision.ops.sigmoid_focal_loss`` (``alpha`` in [0, 1] weights positives,
    ``1 - alpha`` negatives; a list gives one alpha per channel).

    Conventions: the softmax mean is over counted pixels, not pixels x classes, so
    gamma=0 equals CE; the sigmoid mean is over the elements of counted pixels, as
    torchvision and BCE. alpha multiplies the loss and never enters the mean's
    denominator (as torchvision), whereas CE's class ``weight`` does (as torch).
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | list[float] | None = None,
        activation: str = "softmax",
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(ignore_index, reduction)
        if activation not in ("softmax", "sigmoid"):
            raise LossParamError("loss.activation", f"{activation!r} is not one of softmax, sigmoid")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
            raise LossParamError("loss.gamma", f"{gamma!r} must be a number >= 0")
        alpha = class_vector(alpha, "alpha", scalar_ok=True)
        if alpha is not None:
            values = torch.as_tensor(alpha)
            upper = 1.0 if activation == "sigmoid" else float("inf")
            if bool((values < 0).any() or (values > upper).any()):
                limits = "[0, 1] (the weight of positives; negatives get 1 - alpha)" if upper == 1.0 else ">= 0"
                raise LossParamError("loss.alpha", f"{_alpha_text(alpha)} must be in {limits}")
        self.activation = activation
        self.gamma = float(gamma)
        self.sigmoid = activation == "sigmoid"
        self.softmax = activation == "softmax"
        self.scalar_alpha = alpha if isinstance(alpha, float) else None
        self.register_buffer("alpha", alpha if isinstance(alpha, Tensor) else None, persistent=False)

    @classmethod
    def uses_sigmoid(cls, params: dict[str, Any]) -> bool:
        return params.get("activation", "softmax") == "sigmoid"

    def compute(self, logits: Tensor, target: PreparedTarget) -> Tensor:
        alpha: Tensor | float | None = self.scalar_alpha
        if self.alpha is not None:
            check_length(self, "alpha", self.alpha, logits.shape[1])
            # float32 for half-precision logits: the loss is computed in float32 (softmax_focal_loss).
            alpha = self.alpha.to(device=logits.device, dtype=torch.promote_types(logits.dtype, torch.float32))
        if self.sigmoid:
            if isinstance(alpha, Tensor):
                alpha = alpha.view((-1,) + (1,) * (logits.dim() - 2))
            elements = sigmoid_focal_elements(logits, target.dense(logits.dtype), self.gamma, alpha)
            return reduce_channels(elements, target.valid, self.reduction, target.num_counted)
        alpha_t = alpha[target.index] if isinstance(alpha, Tensor) else None
        pixel_loss = softmax_focal_loss(logits, target.raw, self.gamma, alpha_t, self.ignore_index)
        if isinstance(alpha, float):
            pixel_loss = pixel_loss * alpha
        denominator = None if self.ignore_index is None else target.num_counted
        return reduce_pixels(pixel_loss, self.reduction, denominator)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, activation={self.activation!r}, " + super().extra_repr()


def _alpha_text(alpha: Tensor | float) -> str:
    return f"{alpha.tolist() if isinstance(alpha, Tensor) else alpha}"
