"""What every segtrain loss shares: target preparation, reductions, parameter checks."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, ClassVar, TypeVar

from segtrain.errors import LossParamError
import torch
from torch import Tensor, nn

from segtrain.losses.target import PreparedTarget, prepare_target
from segtrain.registry import LOSSES

REDUCTIONS = ("mean", "sum", "none")
ACTIVATIONS = ("softmax", "sigmoid", "none")

LossClass = TypeVar("LossClass", bound=type)


def register_loss(name: str) -> Callable[[LossClass], LossClass]:
    """``@register_loss("ce")``: registers the class in ``LOSSES`` and records its name on it."""

    def decorator(cls: LossClass) -> LossClass:
        cls.name = name
        return LOSSES.register(name)(cls)

    return decorator


class SegLoss(nn.Module):
    """Base class: ``loss(logits, target)`` checks the target once, then computes.

    Subclasses set ``sigmoid`` (the loss works on sigmoid outputs, so a two-class
    dataset gets a 1-channel model) and ``softmax`` (the loss normalises over the
    channels and needs at least two), and implement :meth:`compute`.
    """

    name: ClassVar[str] = "loss"
    # Where this loss sits in the config; a sum sets its terms to loss.terms.<term>.
    config_key: str = "loss"
    # Whether each call checks the target's values (a read back to the host): None checks a
    # CPU target only, so a CUDA step never waits for it; the framework sets False, since its
    # data loaders check every batch on the CPU before the transfer (segtrain.batches.MaskCheck).
    check_targets: bool | None = None

    def __init__(self, ignore_index: int | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise LossParamError("loss.reduction", f"{reduction!r} is not one of {', '.join(REDUCTIONS)}")
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise LossParamError(
                "loss.ignore_index", f"{ignore_index!r} must be an integer class value or null (set dataset.ignore_index)"
            )
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.sigmoid = False
        self.softmax = True

    @classmethod
    def uses_sigmoid(cls, params: dict[str, Any]) -> bool:
        """Whether a loss built from ``params`` would have ``sigmoid=True`` (used before building, by resolve_auto)."""
        return False

    def key(self, param: str) -> str:
        """The config path of a parameter, for error messages."""
        return f"{self.config_key}.{param}"

    def prepare(self, logits: Tensor, target: Tensor) -> PreparedTarget:
        check = target.device.type == "cpu" if self.check_targets is None else self.check_targets
        return prepare_target(
            logits, target, loss=self.name, ignore_index=self.ignore_index, softmax=self.softmax, check_values=check
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.compute_prepared(logits, self.prepare(logits, target))

    def compute_prepared(self, logits: Tensor, target: PreparedTarget) -> Tensor:
        """The loss on an already checked target (a sum checks once for all its terms)."""
        if self.reduction == "mean" and isinstance(target.num_counted, int) and target.num_counted == 0:
            return logits.flatten()[:0].sum()  # an empty target: 0, not the NaN of an empty mean
        # Every pixel ignored (a count on the device, not read here): each loss's mean divides by
        # its count clamped to 1 (reduce_pixels), giving 0 with a zero gradient instead of 0/0 = NaN,
        # so a fully unlabelled crop does not poison the weights.
        return self.compute(logits, target)

    def compute(self, logits: Tensor, target: PreparedTarget) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement compute()")

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise LossParamError("loss.activation", f"{activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return activation


def class_vector(value: Any, param: str, *, scalar_ok: bool) -> Tensor | float | None:
    """A per-class parameter from the config: None, a float (if ``scalar_ok``) or a 1-D float tensor.

    Its length is checked against the model's channels at the first call (:func:`check_length`),
    since the number of classes is not known here.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value == "auto":
            raise LossParamError(
                f"loss.{param}",
                "auto needs the per-class pixel counts of the training masks; build the loss through the "
                "framework (segtrain.losses.resolve_auto replaces auto before build_loss), or give a list of "
                "floats, one per class",
            )
        raise LossParamError(f"loss.{param}", f"{value!r} is not a number or a list of numbers")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not scalar_ok:
            raise LossParamError(f"loss.{param}", f"{value!r}: give a list of floats, one per class")
        return float(value)
    if isinstance(value, Tensor):
        return value.detach().float().reshape(-1)
    if isinstance(value, Sequence) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        if len(value) == 0:
            raise LossParamError(f"loss.{param}", "an empty list; give one float per class or null")
        return torch.tensor([float(v) for v in value])
    raise LossParamError(f"loss.{param}", f"{value!r} is not a number or a list of numbers")


def check_length(loss: SegLoss, param: str, vector: Tensor, channels: int) -> None:
    """A per-class list must have one entry per output channel; say which keys to change if not."""
    if vector.numel() != channels:
        raise ValueError(
            f"loss={loss.name}: {loss.key(param)} has {vector.numel()} values but the model has {channels} "
            f"output channel{'s' if channels != 1 else ''}; give one value per channel in {loss.key(param)} "
            f"or check dataset.num_classes (a two-class dataset with a sigmoid loss has 1 channel)"
        )


def reduce_pixels(pixel_loss: Tensor, reduction: str, denominator: Tensor | int | None) -> Tensor:
    """Reduce a per-pixel loss ``(N, *spatial)`` whose uncounted pixels are already 0.

    ``mean`` divides by ``denominator`` (the number, or the summed weights, of the
    counted pixels), or takes a plain mean when it is ``None`` (nothing left out).
    """
    if reduction == "none":
        return pixel_loss
    total = pixel_loss.sum()
    if reduction == "sum":
        return total
    if denominator is None:
        return pixel_loss.mean()
    return divide_by_count(total, denominator)


def divide_by_count(total: Tensor, denominator: Tensor | int) -> Tensor:
    """``total / denominator`` with a denominator of 0 taken as 1, decided on the device (no host read)."""
    if isinstance(denominator, Tensor):
        # where() keeps 0/0 out of the graph: with nothing counted the total is 0 anyway. (Not a clamp
        # at 1: a sum of class weights may lie in (0, 1).)
        return total / torch.where(denominator > 0, denominator, 1).to(total.dtype)
    return total / max(denominator, 1)


def reduce_channels(elements: Tensor, counted: Tensor | None, reduction: str, num_counted: Tensor | int) -> Tensor:
    """Reduce an element-wise loss ``(N, C, *spatial)`` as torch's element-wise losses do.

    ``mean`` and ``sum`` run over all elements of the counted pixels (so they equal
    ``MSELoss``/``BCEWithLogitsLoss`` when nothing is left out); ``none`` gives the
    per-pixel mean over channels, 0 where a pixel is not counted.
    """
    if counted is not None:
        elements = torch.where(counted.unsqueeze(1), elements, elements.new_zeros(()))
    if reduction == "none":
        return elements.mean(1)
    if reduction == "sum":
        return elements.sum()
    if counted is None:
        return elements.mean()
    return reduce_pixels(elements.sum(1), "mean", num_counted * elements.shape[1])
