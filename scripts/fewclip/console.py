"""What every ``fewclip`` command shares: its logging setup, which errors are the user's, one-line figures.

A command catches an exception, asks :func:`user_error` whether bad input is behind it (a missing dataset or
weights file, a damaged store) and then prints that one line and exits 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from caches.store import WRITE_ERRNOS


def user_error(e: BaseException) -> BaseException | None:
    """The bad-input error behind ``e`` (Hydra wraps errors raised while instantiating), or None."""
    from caches.backbone import UnsupportedBackboneError, WeightsUnavailableError
    from caches.data.records import DatasetError
    from caches.search import IndexSpecError
    from caches.store import StoreError
    from fewclip.recipes import RecipeError

    kinds = (DatasetError, WeightsUnavailableError, UnsupportedBackboneError, StoreError, FileNotFoundError,
             IndexSpecError, RecipeError)
    while e is not None:
        if isinstance(e, kinds):
            return e
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return write_failure(e)
        e = e.__cause__
    return None


def write_failure(e: OSError) -> RuntimeError:
    """'Disk full' / 'read-only' / 'permission denied' outside the cache (outputs, artifacts) as one line."""
    import errno as errno_module
    import os

    where = e.filename if e.filename is not None else "a file"
    return RuntimeError(f"cannot write {where}: {os.strerror(e.errno or 0)} "
                        f"({errno_module.errorcode.get(e.errno or 0, '?')}); free some space or write elsewhere")


def quiet_logging() -> None:
    """fewclip's own INFO lines; third-party libraries (open_clip logs to the root logger) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("fewclip", "adapters", "caches"):
        logging.getLogger(name).setLevel(logging.INFO)


def fmt_hparams(hp: dict[str, Any]) -> str:
    """``alpha=1.17, beta=5.5`` for a run's chosen hyperparameters; ``-`` when there are none."""
    if not hp:
        return "-"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())
