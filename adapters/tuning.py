"""How an adapter is scored on a split, and the generic hyperparameter search on the validation split.

``Adapter.tune`` (adapters/base.py) defaults to :func:`grid_search`; methods with a faster exact search override
it. The search only ever sees ``val``: the test split is scored once, by the runner, after every choice is made.

This module sits below the contract: it imports nothing from ``adapters`` at run time (``Adapter`` is imported
for the annotations only), so base.py can use it without an import cycle.
``predict_split`` tells a cached-feature split from a pixel split by what it offers (``features`` or
``batches()``) for the same reason.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from adapters.base import Adapter

log = logging.getLogger(__name__)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent (0-100). ``logits [N, C]``, ``labels [N]``; ties go to the lowest class."""
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty split")
    correct = int((logits.argmax(dim=-1) == labels.to(logits.device)).sum())
    return correct * 100.0 / labels.numel()


def predict_split(adapter: Adapter, split: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole split: ``([N, C], [N])``.

    ``split`` is a ``FeatureSplit`` (cached ``features [N, D]`` and ``labels [N]``) or, for pixel-mode adapters,
    anything with a ``batches()`` iterator of ``(pixels, labels)`` (``caches.data.pixels.PixelSplit``).
    """
    features = getattr(split, "features", None)
    if isinstance(features, torch.Tensor):
        return adapter.predict(features), split.labels
    logits, labels = [], []
    for x, y in split.batches():
        logits.append(adapter.predict(x))
        labels.append(y)
    if not logits:
        raise ValueError("empty split")
    return torch.cat(logits), torch.cat(labels)


def evaluate(adapter: Adapter, split: Any) -> float:
    """Top-1 accuracy (percent) of ``adapter`` on a feature or pixel split."""
    return accuracy(*predict_split(adapter, split))


def grid_search(adapter: Adapter, val: Any) -> dict[str, Any]:
    """Try every point of ``adapter.hparam_grid()`` in row-major order on ``val``; keep the first best.

    The first best (strict improvement only) makes the choice deterministic and matches the reference
    implementations' loops. Returns the selection record for ``result.json``.
    """
    grid = adapter.hparam_grid()
    if not grid:
        return {"method": "none", "on": "val"}
    names = list(grid)
    best_acc, best = -1.0, None
    for point in itertools.product(*(grid[n] for n in names)):
        for n, v in zip(names, point):
            setattr(adapter, n, v)
        acc = evaluate(adapter, val)
        if acc > best_acc:
            best_acc, best = acc, point
    for n, v in zip(names, best):
        setattr(adapter, n, v)
    size = 1
    for n in names:
        size *= len(grid[n])
    log.info("grid search on val: %s -> %.2f%%", dict(zip(names, best)), best_acc)
    return {"method": "grid", "on": "val", "grid_size": size, "val_acc": best_acc}
