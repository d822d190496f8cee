"""Shared fixtures: the tiny backbone, tiny on-disk image sets, seeded synthetic features."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tests never touch the network: the hub client must fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny():
    from caches.backbone import FrozenClip

    return FrozenClip("fewclip-tiny", None, name="tiny", device="cpu")


def make_image(path: Path, rng: np.random.Generator, cls: int, size: int = 24) -> None:
    """A small RGB image whose colour depends on the class, so the classes are separable."""
    base = np.zeros((size, size, 3), dtype=np.float64)
    base[..., cls % 3] = 200.0
    base[: size // 2, :, (cls + 1) % 3] = 60.0 * (cls // 3 + 1)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def make_class_folder(root: Path, classes: dict[str, int], seed: int = 0, ext: str = ".png") -> Path:
    """ROOT/<class>/<i>.png with ``classes[name]`` images each."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            make_image(root / name / f"img{i:03d}{ext}", rng, c)
    return root


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    return make_class_folder(tmp_path / "imgs", {"red_fox": 10, "blue_jay": 10, "green_tree": 10})


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    root = tmp_path / "split"
    for seed, (split, n) in enumerate((("train", 6), ("val", 3), ("test", 4))):
        make_class_folder(root / split, {"cat": n, "dog": n}, seed=seed)
    return root


def synthetic_features(n_classes: int, per_class: int, dim: int, noise: float, seed: int,
                       means: torch.Tensor | None = None):
    """Class means on the sphere plus noise: ``[n_classes * per_class, dim]`` normalised, labels, means.

    Pass the ``means`` of an earlier call (and another seed) to draw fresh samples of the same classes.
    """
    g = torch.Generator().manual_seed(seed)
    if means is None:
        means = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = means[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return torch.nn.functional.normalize(x, dim=-1), labels, means


def feature_task(n_classes: int, dim: int):
    """Seeded synthetic task: separable classes, a weakly informative text head, 3 views per shot.

    Returns ``(support, text [C, D], val, test)``: 8 shots, 4 val and 30 test images per class.
    """
    from adapters.base import FeatureSplit, SupportSet

    keys, labels, means = synthetic_features(n_classes, 8, dim, noise=0.2, seed=0)
    g = torch.Generator().manual_seed(1)
    views = torch.nn.functional.normalize(keys[None] + 0.2 * torch.randn(3, *keys.shape, generator=g), dim=-1)
    text = torch.nn.functional.normalize(means + 0.8 * torch.randn(n_classes, dim, generator=g), dim=-1)
    val = FeatureSplit(*synthetic_features(n_classes, 4, dim, noise=0.2, seed=2, means=means)[:2])
    test = FeatureSplit(*synthetic_features(n_classes, 30, dim, noise=0.2, seed=3, means=means)[:2])
    support = SupportSet(keys=torch.nn.functional.normalize(views.mean(0), dim=-1), labels=labels, views=views)
    return support, text, val, test


def prompt_task(backbone, names: list[str]):
    """Image features near the embeddings of another template than the text head's: a prompt learner must move
    its context toward it. Returns ``(support, val, test)`` (8 / 4 / 30 per class)."""
    from adapters.base import FeatureSplit, SupportSet

    target = backbone.text_head(names, ["a sketch of the {}, drawn badly."])
    g = torch.Generator().manual_seed(0)

    def draw(n):
        y = torch.arange(len(names)).repeat_interleave(n)
        x = target[y] + 0.15 * torch.randn(len(y), target.shape[1], generator=g)
        return torch.nn.functional.normalize(x, dim=-1), y

    (xs, ys), (xv, yv), (xt, yt) = draw(8), draw(4), draw(30)
    views = torch.nn.functional.normalize(xs[None] + 0.05 * torch.randn(2, *xs.shape, generator=g), dim=-1)
    return SupportSet(keys=xs, labels=ys, views=views), FeatureSplit(xv, yv), FeatureSplit(xt, yt)
