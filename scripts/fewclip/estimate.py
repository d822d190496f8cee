"""How long a set of jobs will take, before running them: image encodes times the backbone's cost per image.

``fewclip demo`` uses it to say up front what it is about to do, and to keep a demo with a real backbone on a CPU
to minutes unless ``--full`` is asked. The count is an upper bound (warm caches encode nothing); the cost per
image is measured on the loaded backbone with a few random images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from adapters.training import epochs_for_shots

# A training step costs about three forward passes (the backward pass about twice the forward).
TRAIN_STEP_PASSES = 3.0


@dataclass
class Work:
    """Encoder passes of one part of a plan: a dataset's cached stores (``adapter`` None) or a pixel adapter."""

    dataset: str
    adapter: str | None
    passes: float


def seconds_per_image(backbone: Any, batch: int = 8, repeats: int = 2) -> float:
    """The backbone's forward time per image, from a few batches of random images (the fastest of ``repeats``)."""
    size = backbone.image_spec.size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    backbone.encode_images(x[:1])  # warm-up: first-call allocations
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        backbone.encode_images(x)
        best = min(best, time.perf_counter() - t)
    return best / batch


def store_passes(dataset: Any, shots: int, views: int) -> float:
    """Images encoded to build a dataset's support (K per class x views), val (min(K, 4) per class) and test
    stores."""
    per_class: dict[int, int] = {}
    for s in dataset.splits["train"]:
        per_class[s.label] = per_class.get(s.label, 0) + 1
    support = sum(min(shots, n) for n in per_class.values())
    val = min(shots, 4) * dataset.n_classes
    return float(support * views + val + len(dataset.splits["test"]))


def pixel_adapter_passes(adapter: Any, dataset: Any, shots: int) -> float:
    """Encoder passes of a pixel-mode adapter: every epoch trains on the support images and scores val, then the
    test split is encoded once."""
    epochs = int(adapter.spec.epochs) if hasattr(adapter, "spec") else 0
    table = getattr(adapter, "epochs_by_shots", None)
    if epochs == 0 and table:
        epochs = epochs_for_shots(table, shots)
    support = shots * dataset.n_classes
    val = min(shots, 4) * dataset.n_classes
    return float(max(epochs, 1) * (TRAIN_STEP_PASSES * support + val) + len(dataset.splits["test"]))


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
