"""What a segmentation task derives from its config, in one place."""
from __future__ import annotations

import torch


def output_channels(num_classes: int, sigmoid: bool) -> int:
    """Logit channels of the model: one for a sigmoid (binary) loss with two classes, else one per class.

    Deriving this here, rather than keeping ``num_classes``, the model's output
    channels and the loss's activation in step by hand, avoids the binary set-up whose
    IoU is stuck at 0.
    """
    return 1 if sigmoid and num_classes == 2 else num_classes


def classes_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Class indices from logits ``(N, C, *spatial)``: the sigmoid at 0.5 for one channel, else argmax."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()  # sigmoid(x) > 0.5  <=>  x > 0
    return logits.argmax(1)
