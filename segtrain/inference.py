"""Sliding-window inference: logits for images larger than the training size.

Windows of ``window`` pixels step by ``stride`` over the image (the last window on each
axis is aligned with the far edge, so every pixel is covered); overlapping logits are
averaged. Images smaller than the window are zero-padded and cropped back. Works for
2D ``(N, C, H, W)`` and 3D ``(N, C, D, H, W)`` batches.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segtrain.errors import ConfigError


VAL_MODES = ("whole", "slide")


@dataclass(frozen=True)
class SlidingWindow:
    """``trainer.window`` / ``trainer.stride``: an int (every axis) or one value per axis;
    ``stride=None`` is half the window (each pixel seen by up to 2**dims windows)."""

    window: int | Sequence[int]
    stride: int | Sequence[int] | None = None

    def per_axis(self, dims: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        window = (int(self.window),) * dims if isinstance(self.window, int) else tuple(int(w) for w in self.window)
        if self.stride is None:
            stride = tuple(max(1, w // 2) for w in window)
        else:
            stride = (int(self.stride),) * dims if isinstance(self.stride, int) else tuple(int(s) for s in self.stride)
        if len(window) != dims or len(stride) != dims or min(stride) < 1 or any(s > w for s, w in zip(stride, window)):
            raise ConfigError(
                f"trainer.window={self.window}, trainer.stride={self.stride}: need {dims} values each (or one int) "
                "with 1 <= stride <= window"
            )
        return window, stride


def sliding_window_from(val_mode: str, window: int | Sequence[int] | None, stride: int | Sequence[int] | None) -> SlidingWindow | None:
    """The sliding window of ``trainer.val_mode`` (None for ``whole``), checked at start-up."""
    if val_mode not in VAL_MODES:
        raise ConfigError(f"trainer.val_mode={val_mode}: use one of {', '.join(VAL_MODES)}")
    if val_mode == "whole":
        return None
    if window is None:
        raise ConfigError("trainer.val_mode=slide needs trainer.window (default: dataset.size), e.g. trainer.window=256")
    return SlidingWindow(window, stride)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last window ends exactly at ``size``."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


def segment_logits(model: nn.Module, images: Tensor, sliding: SlidingWindow | None) -> Tensor:
    """Inference logits of whole images (``sliding`` None) or of averaged windows: one entry point for
    validation, the TensorBoard pictures, ``mode=eval`` and ``mode=predict``."""
    return model(images) if sliding is None else sliding_window_logits(model, images, sliding)


@torch.no_grad()
def sliding_window_logits(model: nn.Module, images: Tensor, sliding: SlidingWindow) -> Tensor:
    """Logits ``(N, out_channels, *spatial)`` of ``images`` from averaged overlapping windows."""
    spatial = images.shape[2:]
    window, stride = sliding.per_axis(len(spatial))
    # Pad axes shorter than the window, so every window has the training size.
    padding = [max(0, w - s) for w, s in zip(window, spatial)]
    if any(padding):
        images = F.pad(images, [value for p in reversed(padding) for value in (0, p)])
    padded = images.shape[2:]
    logits_sum: Tensor | None = None
    counts = torch.zeros((1, 1, *padded), device=images.device)
    for starts in itertools.product(*(window_starts(s, w, st) for s, w, st in zip(padded, window, stride))):
        region = tuple(slice(start, start + w) for start, w in zip(starts, window))
        logits = model(images[(slice(None), slice(None), *region)])
        if logits_sum is None:
            logits_sum = torch.zeros((images.shape[0], logits.shape[1], *padded), device=images.device, dtype=logits.dtype)
        logits_sum[(slice(None), slice(None), *region)] += logits
        counts[(slice(None), slice(None), *region)] += 1
    assert logits_sum is not None  # at least one window always exists
    logits = logits_sum / counts
    return logits[(slice(None), slice(None), *(slice(0, s) for s in spatial))]
