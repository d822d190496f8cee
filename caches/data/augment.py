"""Image transforms: the eval transform and seeded augmented views for the support cache.

Augmentation is Tip-Adapter's: random resized crop (scale 0.5-1) and horizontal flip. Crop parameters come
from a ``torch.Generator`` seeded by (seed, view, sample id), so a view is the same on every run and on every
worker, whatever order the loader visits images in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from caches.backbone import ImageSpec

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}


@dataclass(frozen=True)
class AugmentSpec:
    """Random resized crop + horizontal flip parameters (goes into the support store's fingerprint)."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def as_dict(self) -> dict:
        return {"kind": "random_resized_crop+hflip", **{k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in asdict(self).items()}}


def _to_tensor(img: Image.Image, spec: ImageSpec) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img), list(spec.mean), list(spec.std))


def eval_transform(spec: ImageSpec) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``spec.size``, centre crop, normalise: ``PIL -> [3, S, S]``."""
    interp = _INTERP.get(spec.interpolation, InterpolationMode.BICUBIC)

    def apply(img: Image.Image) -> torch.Tensor:
        img = TF.resize(img, spec.size, interpolation=interp)
        img = TF.center_crop(img, [spec.size, spec.size])
        return _to_tensor(img, spec)

    return apply


def view_generator(seed: int, view: int, sample_id: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{view}|{sample_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


def crop_params(width: int, height: int, aug: AugmentSpec, gen: torch.Generator) -> tuple[int, int, int, int]:
    """Random resized crop box (top, left, h, w) drawn from ``gen``; centre crop after 10 failed tries.

    Same sampling rule as torchvision's RandomResizedCrop, re-derived to take a local generator.
    """
    area = width * height
    log_lo, log_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=gen).tolist()
        target = area * (aug.scale[0] + u[0] * (aug.scale[1] - aug.scale[0]))
        ratio = math.exp(log_lo + u[1] * (log_hi - log_lo))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[2] * (height - h + 1))
            left = int(u[3] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < aug.ratio[0]:
        w, h = width, int(round(width / aug.ratio[0]))
    elif in_ratio > aug.ratio[1]:
        h, w = height, int(round(height * aug.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augmented_view(img: Image.Image, spec: ImageSpec, aug: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """One augmented view ``PIL -> [3, S, S]``."""
    top, left, h, w = crop_params(img.width, img.height, aug, gen)
    interp = _INTERP.get(spec.interpolation, InterpolationMode.BICUBIC)
    img = TF.resized_crop(img, top, left, h, w, [spec.size, spec.size], interpolation=interp)
    if torch.rand(1, generator=gen).item() < aug.flip_p:
        img = TF.hflip(img)
    return _to_tensor(img, spec)
