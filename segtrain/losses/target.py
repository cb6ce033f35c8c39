"""The one place where a segmentation target is checked and converted for a loss.

Every loss calls :func:`prepare_target` first, so shape and ignore-index handling is the
same for all of them. Checking the target's *values* needs a read back to the host, so it
is not done on the device in a training step: the data loader checks every batch on the
CPU before the transfer (:class:`segtrain.batches.MaskCheck`, with the same message,
:func:`target_value_message`), and a loss called directly checks a CPU target itself
(``SegLoss.check_targets``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from segtrain.errors import MaskValueError
import torch
import torch.nn.functional as F
from torch import Tensor


def num_target_values(channels: int) -> int:
    """Class values a target may hold for a model with ``channels`` outputs: 0/1 for one (binary) channel."""
    return 2 if channels == 1 else channels


def bad_target_values(target: Tensor, channels: int, ignore_index: int | None) -> list[int]:
    """Up to 10 distinct values of ``target`` outside ``[0, num_target_values(channels))`` that are not
    ``ignore_index``; ``[]`` when all are valid. Reads values back to the host: call it on the CPU."""
    if target.numel() == 0:
        return []
    target = target.long()  # before comparing with ignore_index: a uint8 mask would wrap -100 to 156
    num_values = num_target_values(channels)
    low, high = torch.aminmax(target)
    if low >= 0 and high < num_values:  # the common case: one pass over the mask
        return []
    bad = (target < 0) | (target >= num_values)
    if ignore_index is not None:
        bad &= target != ignore_index
    return target[bad].unique()[:10].tolist()


def target_value_message(where: str, bad: list[int], channels: int, ignore_index: int | None) -> str:
    """The error for targets holding ``bad`` values: what is allowed and which config keys to change."""
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
    return (
        f"{where}: target values {bad} are outside [0, {num_target_values(channels)}) and are not "
        f"dataset.ignore_index={ignore_index}; {fix}"
    )


@dataclass
class PreparedTarget:
    """A checked target, in the forms the losses need, each made on first use.

    ``raw`` is the ``(N, *spatial)`` int64 target with ignored pixels kept, for torch's
    own losses that take ``ignore_index``. ``index`` is the class index with ignored
    pixels set to 0, so gather/one-hot work on it; ``valid`` marks the counted pixels
    and is ``None`` without an ignore index. ``num_counted`` is the number of counted
    pixels: an int without an ignore index, else a 0-dim tensor on the target's device
    (never read back to the host here).
    """

    raw: Tensor
    ignore_index: int | None
    num_channels: int
    # Forms made so far (a plain dict, not functools.cached_property, whose lock torch.compile cannot trace).
    made: dict[str, Any] = field(default_factory=dict, repr=False)

    def _once(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self.made:
            self.made[name] = make()
        return self.made[name]

    @property
    def valid(self) -> Tensor | None:
        return self._once("valid", lambda: None if self.ignore_index is None else self.raw != self.ignore_index)

    @property
    def ignored(self) -> Tensor | None:
        """The left-out pixels ``(N, *spatial)``, or ``None`` without an ignore index."""
        return self._once("ignored", lambda: None if self.valid is None else ~self.valid)

    @property
    def index(self) -> Tensor:
        return self._once("index", lambda: self.raw if self.ignored is None else self.raw.masked_fill(self.ignored, 0))

    @property
    def num_counted(self) -> Tensor | int:
        return self._once("num_counted", lambda: self.raw.numel() if self.valid is None else self.valid.sum())

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
    logits: Tensor, target: Tensor, *, loss: str, ignore_index: int | None, softmax: bool, check_values: bool = True
) -> PreparedTarget:
    """Checks ``target`` against ``logits`` and returns it in the forms the losses need.

    ``logits`` is ``(N, C, *spatial)``; ``target`` an integer index mask ``(N, *spatial)``
    or ``(N, 1, *spatial)``. With one output channel (a binary sigmoid model) the
    target may hold 0 and 1 only; with C channels, values in ``[0, C)``. Pixels equal
    to ``ignore_index`` are left out. ``softmax`` says the loss normalises over
    channels and so needs at least two. ``check_values`` checks the values against the
    classes (a host read); the shape and type checks need none.
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
    if check_values:  # a host read: on request, or for a CPU target (SegLoss.check_targets)
        bad = bad_target_values(target, channels, ignore_index)
        if bad:
            raise MaskValueError(target_value_message(f"loss={loss}", bad, channels, ignore_index))
    return PreparedTarget(target, ignore_index, channels)
