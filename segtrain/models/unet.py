"""UNet for 2D images and 3D volumes (Ronneberger et al. 2015; Cicek et al. 2016)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.registry import MODELS

NORMS = ("batch", "group", "instance", "none")


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm3d(channels)
    if kind == "group":
        # 8 groups (or fewer for narrow layers): GroupNorm keeps statistics per sample,
        # so results do not depend on the batch size or the number of processes.
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True) if dims == 2 else nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """(conv 3x3 -> norm -> ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int, dims: int, norm: str) -> None:
        conv = _conv(dims)
        bias = norm == "none"  # a norm layer right after makes the conv bias redundant
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels, dims),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels, dims),
            nn.ReLU(inplace=True),
        )


@MODELS.register("unet")
class UNet(nn.Module):
    """UNet with ``depth`` downsamplings; channels ``width * 2**level``.

    Accepts any spatial size at least ``2**depth`` per axis: the decoder upsamples
    each feature map to the exact size of its skip connection, so sizes need not be
    multiples of ``2**depth``.

    Args:
        in_channels: image channels (from ``dataset.in_channels``).
        out_channels: logit channels (derived from ``dataset.num_classes`` and the loss).
        dims: 2 for images ``(N, C, H, W)``, 3 for volumes ``(N, C, D, H, W)``.
        width: channels of the first level.
        depth: number of downsamplings.
        norm: ``batch``, ``group``, ``instance`` or ``none``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dims: int = 2,
        width: int = 32,
        depth: int = 4,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"model.dims={dims}: a UNet is 2D or 3D; use model.dims=2 or model.dims=3")
        if norm not in NORMS:
            raise ValueError(f"model.norm={norm}: unknown normalisation; known: {', '.join(NORMS)}")
        if isinstance(depth, str):  # model.depth=auto is resolved by segtrain.build.build, from dataset.size
            raise ValueError(f"model.depth={depth}: building a UNet directly needs a whole number (auto is resolved by segtrain.build.build)")
        if depth < 1 or width < 1:
            raise ValueError(f"model.depth={depth}, model.width={width}: both must be at least 1")
        self.dims, self.depth, self.norm = dims, depth, norm
        channels = [width * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList([DoubleConv(in_channels, channels[0], dims, norm)])
        self.encoder.extend(DoubleConv(channels[i], channels[i + 1], dims, norm) for i in range(depth))
        # Decoder level i takes the upsampled deeper map (channels[i+1]) reduced to channels[i]
        # by a 1x1 conv, concatenated with the skip (channels[i]).
        self.reduce = nn.ModuleList(_conv(dims)(channels[i + 1], channels[i], 1) for i in range(depth))
        self.decoder = nn.ModuleList(DoubleConv(2 * channels[i], channels[i], dims, norm) for i in range(depth))
        self.head = _conv(dims)(channels[0], out_channels, 1)
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        self.upsample_mode = "bilinear" if dims == 2 else "trilinear"

    @property
    def size_multiple(self) -> int:
        """Inputs need at least this many pixels a side (``depth`` poolings by 2); other sizes than
        multiples of it work: the decoder interpolates to each skip's size (no padding)."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dims + 2:
            raise ValueError(
                f"UNet with model.dims={self.dims} expects input (N, C, {'D, ' if self.dims == 3 else ''}H, W), "
                f"got shape {tuple(x.shape)}"
            )
        if min(x.shape[2:]) < 2**self.depth:
            raise ValueError(
                f"input of spatial size {tuple(x.shape[2:])} is too small for model.depth={self.depth}: "
                f"each axis needs at least {2**self.depth} voxels; lower model.depth or raise dataset.size"
            )
        if self.norm == "instance" and math.prod(size // 2**self.depth for size in x.shape[2:]) < 2:
            raise ValueError(
                f"input of spatial size {tuple(x.shape[2:])} leaves one element per channel after model.depth={self.depth} "
                "downsamplings, where instance normalisation has no statistics; lower model.depth or use another model.norm"
            )
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for level in reversed(range(self.depth)):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode=self.upsample_mode, align_corners=False)
            x = self.decoder[level](torch.cat([skip, self.reduce[level](x)], dim=1))
        return self.head(x)
