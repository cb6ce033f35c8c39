"""Cross-entropy style losses: ce, nll, bce."""
from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor

from segtrain.errors import LossParamError
from segtrain.losses.base import (
    SegLoss,
    check_length,
    class_vector,
    divide_by_count,
    reduce_channels,
    register_loss,
)
from segtrain.losses.target import PreparedTarget

# torch's default ignore_index; no valid target holds it (values are checked to be in [0, C) or the
# ignore index: by the loaders' MaskCheck in training, by prepare_target for a CPU target).
_TORCH_NO_IGNORE = -100


@register_loss("ce")
class CrossEntropyLoss(SegLoss):
    """``torch.nn.CrossEntropyLoss`` on segmentation masks (softmax over the C channels).

    ``weight`` is a list of C class weights (or ``auto`` resolved from the training
    masks: classes rarer than the median class weighted up to its share, the others 1);
    a weighted mean divides by the summed weights of the counted pixels, as torch does.
    Same value and gradient as torch.
    """

    def __init__(
        self,
        weight: list[float] | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(ignore_index, reduction)
        if not 0.0 <= label_smoothing <= 1.0:
            raise LossParamError("loss.label_smoothing", f"{label_smoothing!r} must be in [0, 1]")
        self.register_buffer("weight", class_vector(weight, "weight", scalar_ok=False), persistent=False)
        self.label_smoothing = float(label_smoothing)

    def compute(self, logits: Tensor, target: PreparedTarget) -> Tensor:
        weight, ignore_index = torch_class_arguments(self, logits)
        return torch_mean(
            lambda reduction: F.cross_entropy(
                logits, target.raw, weight=weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=self.label_smoothing,
            ),
            self.reduction, weight, target,
        )


def torch_mean(loss: Callable[[str], Tensor], reduction: str, weight: Tensor | None, target: PreparedTarget) -> Tensor:
    """A torch class loss (``loss(reduction)``) reduced as torch does, except that with ignored pixels
    the mean is its sum over the (weighted) count of counted pixels, that count clamped to 1 on the
    device: every pixel ignored gives 0 and a zero gradient where torch gives 0/0 = NaN."""
    if reduction != "mean" or target.valid is None:
        return loss(reduction)
    counted = target.num_counted if weight is None else (weight[target.index] * target.valid).sum()
    return divide_by_count(loss("sum"), counted)


def torch_class_arguments(loss: SegLoss, logits: Tensor) -> tuple[Tensor | None, int]:
    """``weight`` (checked against C, on the logits' device and dtype) and ``ignore_index`` as torch's losses take them."""
    weight = loss.weight
    if weight is not None:
        check_length(loss, "weight", weight, logits.shape[1])
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    return weight, _TORCH_NO_IGNORE if loss.ignore_index is None else loss.ignore_index


@register_loss("nll")
class NLLLoss(SegLoss):
    """``torch.nn.NLLLoss`` on ``log_softmax(logits)``: ce without label smoothing, for configs that name it."""

    def __init__(self, weight: list[float] | None = None, ignore_index: int | None = None, reduction: str = "mean") -> None:
        super().__init__(ignore_index, reduction)
        self.register_buffer("weight", class_vector(weight, "weight", scalar_ok=False), persistent=False)

    def compute(self, logits: Tensor, target: PreparedTarget) -> Tensor:
        weight, ignore_index = torch_class_arguments(self, logits)
        log_probs = F.log_softmax(logits, dim=1)
        return torch_mean(
            lambda reduction: F.nll_loss(log_probs, target.raw, weight=weight, ignore_index=ignore_index, reduction=reduction),
            self.reduction, weight, target,
        )


@register_loss("bce")
class BCEWithLogitsLoss(SegLoss):
    """``torch.nn.BCEWithLogitsLoss``: binary (1 channel, target == 1 is positive) or multi-label (C channels, one-hot).

    ``pos_weight`` is a scalar, one float per channel, or ``auto`` (negatives /
    positives counted on the training masks). ``mean``/``sum`` run over all
    elements of the counted pixels as in torch; ``none`` gives the per-pixel mean
    over channels.
    """

    def __init__(
        self, pos_weight: float | list[float] | None = None, ignore_index: int | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__(ignore_index, reduction)
        self.sigmoid = True
        self.softmax = False
        pos_weight = class_vector(pos_weight, "pos_weight", scalar_ok=True)
        self.scalar_pos_weight = pos_weight if isinstance(pos_weight, float) else None
        self.register_buffer("pos_weight", pos_weight if isinstance(pos_weight, Tensor) else None, persistent=False)

    @classmethod
    def uses_sigmoid(cls, params: dict[str, Any]) -> bool:
        return True

    def compute(self, logits: Tensor, target: PreparedTarget) -> Tensor:
        channels = logits.shape[1]
        pos_weight = None
        if self.pos_weight is not None:
            check_length(self, "pos_weight", self.pos_weight, channels)
            # One weight per channel, broadcast over the spatial axes (torch would broadcast over the last axis).
            shape = (channels,) + (1,) * (logits.dim() - 2)
            pos_weight = self.pos_weight.to(device=logits.device, dtype=logits.dtype).view(shape)
        elif self.scalar_pos_weight is not None:
            pos_weight = logits.new_tensor(self.scalar_pos_weight)
        elements = F.binary_cross_entropy_with_logits(
            logits, target.dense(logits.dtype), pos_weight=pos_weight, reduction="none"
        )
        return reduce_channels(elements, target.valid, self.reduction, target.num_counted)
