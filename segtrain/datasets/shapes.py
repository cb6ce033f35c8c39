"""Synthetic shapes: the embedded default dataset, generated on the fly (nothing on disk).

2D: ellipses, rectangles and triangles; 3D: ellipsoids, boxes and octahedra. Each
sample has several shapes at random positions, sizes and rotations, drawn in order so
that later shapes cover earlier ones, with a random colour that only loosely depends on
the class, over a textured background (smooth colour field and stripes), plus pixel
noise. The class must be told from the geometry, not the colour alone.

Sample ``i`` of a split is a pure function of ``(seed, split, i)``; the train and val
splits use disjoint generator seeds, so they never share a sample.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from segtrain.datasets.sample_cache import SampleCache
from segtrain.registry import DATASETS

SHAPES_2D = ("ellipse", "rectangle", "triangle")
SHAPES_3D = ("ellipsoid", "box", "octahedron")
# Class colours are mixed 70:30 with a random colour: classes overlap in colour, and shading,
# background and noise blur them further.
_CLASS_COLOURS = torch.tensor([[0.9, 0.3, 0.2], [0.2, 0.8, 0.3], [0.25, 0.35, 0.9]])
_SPLIT_OFFSET = {"train": 0, "val": 2**31}


class Shapes(Dataset):
    """Random shapes on a textured background; ``num_classes - 1`` shape kinds plus background."""

    def __init__(
        self,
        split: str,
        dims: int = 2,
        size: int | list[int] = 64,
        num_classes: int = 4,
        in_channels: int = 3,
        train_samples: int = 2000,
        val_samples: int = 200,
        max_shapes: int = 5,
        noise: float = 0.1,
        seed: int = 0,
        cache: bool = True,
        **_meta: object,  # num_workers, class_names, ... belong to other parts of the config
    ) -> None:
        kinds = SHAPES_2D if dims == 2 else SHAPES_3D
        if not 2 <= num_classes <= len(kinds) + 1:
            raise ValueError(
                f"dataset.num_classes={num_classes}: shapes{'' if dims == 2 else '3d'} has background plus up to "
                f"{len(kinds)} shape classes ({', '.join(kinds)}); use 2 to {len(kinds) + 1}"
            )
        if in_channels not in (1, 3):
            raise ValueError(f"dataset.in_channels={in_channels}: shapes draws grayscale (1) or RGB (3) images")
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split={split!r}: use 'train' or 'val'")
        self.split, self.dims, self.num_classes, self.in_channels = split, dims, num_classes, in_channels
        self.class_names = ["background", *kinds[: num_classes - 1]]
        self.size = tuple(size) if isinstance(size, (list, tuple)) else (int(size),) * dims
        if len(self.size) != dims:
            raise ValueError(f"dataset.size={list(self.size)}: needs {dims} entries for {dims}D data")
        self.length = train_samples if split == "train" else val_samples
        self.max_shapes, self.noise, self.seed = max_shapes, noise, seed
        # Samples are pure functions of their index, so keeping them is safe; it spares
        # regenerating every epoch (the cache lives per DataLoader worker process).
        self._cache = SampleCache(cache)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, mask = self._cache.get(index, self._generate)
        return image.float(), mask.long()

    def _generate(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # torch's CPU generator keeps only the low 32 bits of a seed: train seeds fill [0, 2**31),
        # val seeds [2**31, 2**32), so the two splits can never draw the same sample.
        rng = torch.Generator().manual_seed(_SPLIT_OFFSET[self.split] + (self.seed * 1_000_003 + index) % 2**31)
        # Coordinates in [-1, 1] per axis, shape (dims, *size).
        axes = [torch.linspace(-1, 1, n) for n in self.size]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        image = self._background(coords, rng)
        mask = torch.zeros(self.size, dtype=torch.uint8)
        num_shapes = int(torch.randint(2, self.max_shapes + 1, (1,), generator=rng))
        for _ in range(num_shapes):
            label = int(torch.randint(1, self.num_classes, (1,), generator=rng))
            inside = self._draw(label, coords, rng)
            colour = 0.7 * _CLASS_COLOURS[label - 1] + 0.3 * torch.rand(3, generator=rng)
            # A linear shading across the shape: texture, not a flat fill.
            shade = 1 + 0.25 * torch.einsum("d,d...->...", torch.randn(self.dims, generator=rng), coords)
            fill = colour.view(3, *([1] * self.dims)) * shade
            image = torch.where(inside, fill, image)
            mask[inside] = label
        image = image + self.noise * torch.randn(image.shape, generator=rng)
        if self.in_channels == 1:
            image = image.mean(0, keepdim=True)
        return image.clamp(0, 1).half(), mask

    def _background(self, coords: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        base = 0.2 + 0.6 * torch.rand(3, generator=rng)
        gradient = torch.einsum("d,d...->...", 0.3 * torch.randn(self.dims, generator=rng), coords)
        direction = torch.randn(self.dims, generator=rng)
        frequency = 4 + 12 * float(torch.rand(1, generator=rng))
        stripes = 0.15 * torch.sin(frequency * torch.einsum("d,d...->...", direction, coords))
        return (base.view(3, *([1] * self.dims)) + gradient + stripes).expand(3, *self.size).clone()

    def _draw(self, label: int, coords: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Boolean mask of one shape of class ``label`` at a random pose."""
        centre = (torch.rand(self.dims, generator=rng) * 1.4 - 0.7).view(-1, *([1] * self.dims))
        radii = (0.2 + 0.3 * torch.rand(self.dims, generator=rng)).view(-1, *([1] * self.dims))
        local = _rotate(coords - centre, rng, self.dims) / radii
        kind = (SHAPES_2D if self.dims == 2 else SHAPES_3D)[label - 1]
        if kind in ("ellipse", "ellipsoid"):
            return (local**2).sum(0) <= 1
        if kind in ("rectangle", "box"):
            return local.abs().amax(0) <= 0.8
        if kind == "octahedron":
            return local.abs().sum(0) <= 1.2
        # Triangle: intersection of three half-planes with outward normals 120 degrees apart.
        angles = torch.tensor([math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3])
        normals = torch.stack([torch.cos(angles), torch.sin(angles)], 1)  # (3, 2)
        return (torch.einsum("kd,d...->k...", normals, local) <= 0.5).all(0)


def _rotate(points: torch.Tensor, rng: torch.Generator, dims: int) -> torch.Tensor:
    """Apply a random rotation to ``(dims, *size)`` coordinates."""
    if dims == 2:
        angle = float(torch.rand(1, generator=rng)) * 2 * math.pi
        rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    else:
        rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=rng))
    return torch.einsum("ij,j...->i...", rotation, points)


@DATASETS.register("shapes")
def shapes(split: str, **params: object) -> Shapes:
    """2D shapes: background, ellipse, rectangle, triangle."""
    return Shapes(split, dims=2, **params)


@DATASETS.register("shapes3d")
def shapes3d(split: str, **params: object) -> Shapes:
    """3D shapes: background, ellipsoid, box, octahedron."""
    return Shapes(split, dims=3, **params)
