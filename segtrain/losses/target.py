"""The one place where a segmentation target is checked and converted for a loss.

Every loss calls :func:`prepare_target` first, so shape, value and ignore-index
handling is the same for all of them and bad input fails here with a message a
user can act on, before any loss kernel runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PreparedTarget:
    """A checked target, in the forms the losses need.

    ``index`` is the ``(N, *spatial)`` int64 class index with ignored pixels set
    to 0, so gather/one-hot work on it; ``valid`` marks the counted pixels and is
    ``None`` when no pixel is ignored (the fast path). ``raw`` is the int64 target
    with ignored pixels kept, for torch's own losses that take ``ignore_index``.
    """

    index: Tensor
    raw: Tensor
    valid: Tensor | None
    num_channels: int
    num_counted: int

    @cached_property
    def ignored(self) -> Tensor | None:
        """The left-out pixels ``(N, *spatial)``, or ``None`` when every pixel counts."""
        return None if self.valid is None else ~self.valid

    def dense(self, dtype: torch.dtype) -> Tensor:
        """The ``(N, C, *spatial)`` target: one-hot for C > 1, ``index == 1`` for one channel (binary).

        Ignored pixels are all-zero rows here; losses must still mask them with ``valid``.
        """
        if self.num_channels == 1:
            dense = (self.index == 1).unsqueeze(1)
        else:
            dense = F.one_hot(self.index, self.num_channels).movedim(-1, 1)
        if self.ignored is not None:
            dense = dense.masked_fill(self.ignored.unsqueeze(1), False)
        return dense.to(dtype)


def prepare_target(
    logits: Tensor, target: Tensor, *, loss: str, ignore_index: int | None, softmax: bool
) -> PreparedTarget:
    """Checks ``target`` against ``logits`` and returns it in the forms the losses need.

    ``logits`` is ``(N, C, *spatial)``; ``target`` an integer index mask ``(N, *spatial)``
    or ``(N, 1, *spatial)``. With one output channel (a binary sigmoid model) the
    target may hold 0 and 1 only; with C channels, values in ``[0, C)``. Pixels equal
    to ``ignore_index`` are left out. ``softmax`` says the loss normalises over
    channels and so needs at least two.
    """
    if logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(
            f"loss={loss}: the prediction must be float logits (N, C, *spatial), got {logits.dtype} "
            f"of shape {tuple(logits.shape)}"
        )
    if target.dim() == logits.dim() and target.shape[1] == 1:
        target = target.squeeze(1)
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"loss={loss}: prediction {tuple(logits.shape)} and target {tuple(target.shape)} do not match; "
            f"the target must be (N, *spatial) = {expected} or (N, 1, *spatial). Check that the model's "
            f"output size equals the mask size (model config, dataset.size and the dataset's transforms)"
        )
    if target.is_floating_point() or target.is_complex():
        raise TypeError(
            f"loss={loss}: the target must be an integer class-index mask, got {target.dtype}; "
            f"the dataset should return masks as int64 (or uint8) class indices"
        )
    channels = logits.shape[1]
    if softmax and channels == 1:
        raise ValueError(
            f"loss={loss} normalises over classes (softmax) but the model has 1 output channel; a 1-channel "
            f"(binary) model needs a sigmoid loss (loss=bce, or focal/dice/mse with loss.activation=sigmoid), "
            f"or give the model dataset.num_classes >= 2 output channels"
        )
    # int64 before comparing with ignore_index: a uint8 mask would wrap -100 to 156.
    target = target.long()
    num_values = 2 if channels == 1 else channels
    if target.numel() == 0:
        return PreparedTarget(target, target, None, channels, 0)

    if ignore_index is None:
        valid = None
        low, high = torch.aminmax(target)
        num_counted_t = torch.full((), target.numel(), device=target.device)
        index = target
    else:
        # Which pixels count, and the index with ignored pixels set to class 0, in integer
        # arithmetic (|target - ignore_index| clamped to 1 is 1 where a pixel counts, else 0)
        # rather than `target == ignore_index` and torch.where: on the CPU those run at a third
        # to a quarter of the speed of these vectorised ops, and this check runs at every loss call.
        counted = (target - ignore_index).abs_().clamp_(max=1)
        valid = counted.bool()  # 1 byte a pixel instead of 8
        num_counted_t = counted.sum()
        # target & -counted: the target where counted, else 0; in place (one int64 buffer for both),
        # and a bitwise and, which is vectorised where an int64 multiply is not (2x faster here).
        index = counted.neg_().bitwise_and_(target)
        low, high = torch.aminmax(index)
    # One host sync per step, on purpose: checking values here is what turns an
    # out-of-range class into a readable error instead of a device-side assert (or a
    # silently wrong one-hot), and it tells us whether any pixel is ignored at all.
    low_v, high_v, num_counted = torch.stack([low, high, num_counted_t]).tolist()
    if low_v < 0 or high_v >= num_values:
        bad = index[(index < 0) | (index >= num_values)].unique()[:10].tolist()
        ignore_text = f"dataset.ignore_index={ignore_index}"
        if channels == 1:
            fix = (
                "a 1-output-channel (binary) model takes 0 = background and 1 = foreground only; for more "
                "classes set dataset.num_classes to the number of classes (the model then gets one channel "
                "per class and a multi-label target), or set dataset.ignore_index to the value that marks "
                "unlabelled pixels"
            )
        else:
            fix = (
                f"the model has {channels} output channels (dataset.num_classes); set dataset.num_classes to "
                "cover every class in the masks, or set dataset.ignore_index to the value that marks "
                "unlabelled pixels"
            )
        raise ValueError(
            f"loss={loss}: target values {bad} are outside [0, {num_values}) and are not {ignore_text}; {fix}"
        )
    if num_counted == target.numel():
        valid = None
    return PreparedTarget(index, target, valid, channels, num_counted)
