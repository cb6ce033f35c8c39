"""Segmentation metrics from one confusion matrix accumulated over a whole split."""
from __future__ import annotations

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Accumulates ``matrix[true, predicted]`` pixel counts with ``torch.bincount``.

    Pixels whose target equals ``ignore_index`` are left out. IoU and Dice come from
    the accumulated matrix, never from averages of per-batch scores. A class absent
    from both the ground truth and the predictions has no IoU (NaN) and is left out of
    the means, rather than counted as 0 or 1.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true class indices (same shape)."""
        target = target.reshape(-1)
        prediction = prediction.reshape(-1)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            target, prediction = target[keep], prediction[keep]
        index = target.to(torch.int64) * self.num_classes + prediction.to(torch.int64)
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def reduce_across_processes(self) -> None:
        """Sum the matrices of all processes (DDP); a no-op without torch.distributed."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self) -> dict[str, float | list[float]]:
        """Pixel accuracy, per-class IoU and Dice, and their means over present classes."""
        matrix = self.matrix.double()
        true_positive = matrix.diag()
        true_count = matrix.sum(1)  # pixels of each class in the ground truth
        predicted_count = matrix.sum(0)
        union = true_count + predicted_count - true_positive
        present = union > 0
        nan = torch.full_like(true_positive, float("nan"))
        iou = torch.where(present, true_positive / union.clamp(min=1), nan)
        dice = torch.where(present, 2 * true_positive / (true_count + predicted_count).clamp(min=1), nan)
        total = matrix.sum()
        return {
            "acc": float(true_positive.sum() / total) if total > 0 else float("nan"),
            "mIoU": float(iou[present].mean()) if present.any() else float("nan"),
            "dice": float(dice[present].mean()) if present.any() else float("nan"),
            "IoU": iou.tolist(),
            "Dice": dice.tolist(),
            # Per class, the share of its ground-truth pixels predicted as it (recall); NaN for an absent class.
            "class_acc": torch.where(true_count > 0, true_positive / true_count.clamp(min=1), nan).tolist(),
        }
