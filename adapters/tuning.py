"""Generic hyperparameter search on the validation split (never the test split)."""

from __future__ import annotations

import itertools
import logging
from typing import Any

from adapters.base import Adapter, evaluate

log = logging.getLogger(__name__)


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
