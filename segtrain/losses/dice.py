"""Soft Dice loss."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from segtrain.losses.base import SegLoss, register_loss
from segtrain.errors import LossParamError
from segtrain.losses.target import PreparedTarget


@register_loss("dice")
class DiceLoss(SegLoss):
    """Soft Dice: ``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` per class, then averaged.

    ``activation=softmax`` (one-hot target) or ``sigmoid`` (binary with 1 channel,
    multi-label with C). Sums run over the spatial axes of each sample, or over the
    batch too with ``batch_dice=true`` (nnU-Net's option). ``include_background=false``
    leaves out channel 0 when there are several channels. Dice is not a per-pixel loss:
    ``reduction=none`` returns the ``(N, C')`` per-sample, per-class losses (``(C',)``
    with batch_dice), ``sum``/``mean`` sum/average them. Ignored pixels are removed from
    both prediction and target. Sums are taken in float32, also under autocast.
    """

    def __init__(
        self,
        activation: str = "softmax",
        smooth: float = 1e-5,
        include_background: bool = True,
        batch_dice: bool = False,
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(ignore_index, reduction)
        if activation not in ("softmax", "sigmoid"):
            raise LossParamError("loss.activation", f"{activation!r} is not one of softmax, sigmoid")
        if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or smooth < 0:
            raise LossParamError("loss.smooth", f"{smooth!r} must be a number >= 0")
        self.activation = activation
        self.smooth = float(smooth)
        self.include_background = bool(include_background)
        self.batch_dice = bool(batch_dice)
        self.sigmoid = activation == "sigmoid"
        self.softmax = activation == "softmax"

    @classmethod
    def uses_sigmoid(cls, params: dict[str, Any]) -> bool:
        return params.get("activation", "softmax") == "sigmoid"

    def compute(self, logits: Tensor, target: PreparedTarget) -> Tensor:
        # float32 sums: in float16 a 128x128 sum of probabilities loses the small classes.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            probs = torch.softmax(logits, 1) if self.softmax else torch.sigmoid(logits)
            dense = target.dense(probs.dtype)  # already zero on ignored pixels
            if target.ignored is not None:
                probs = probs.masked_fill(target.ignored.unsqueeze(1), 0.0)
            if not self.include_background and probs.shape[1] > 1:
                probs, dense = probs[:, 1:], dense[:, 1:]
            axes = tuple(range(2, probs.dim()))
            if self.batch_dice:
                axes = (0,) + axes
            intersection = (probs * dense).sum(axes)
            denominator = probs.sum(axes) + dense.sum(axes)
            loss = 1.0 - (2.0 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-12)
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()

    def extra_repr(self) -> str:
        return (
            f"activation={self.activation!r}, smooth={self.smooth}, include_background={self.include_background}, "
            f"batch_dice={self.batch_dice}, " + super().extra_repr()
        )
