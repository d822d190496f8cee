"""What every ``fewclip`` command shares: its logging setup, which errors are the user's, one-line figures.

A command catches an exception, asks :func:`user_error` whether bad input is behind it (a missing dataset or
weights file, a damaged store) and then prints that one line and exits 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from caches.storefiles import WRITE_ERRNOS


def user_error(e: BaseException) -> BaseException | None:
    """The bad-input error behind ``e`` (Hydra wraps errors raised while instantiating), or None."""
    from caches.backbone import UnsupportedBackboneError
    from caches.data.records import DatasetError
    from caches.search import IndexSpecError
    from caches.store import StoreError
    from caches.weights import BackboneConfigError, WeightsUnavailableError
    from fewclip.config import SettingsError
    from fewclip.recipes import RecipeError

    kinds = (DatasetError, WeightsUnavailableError, UnsupportedBackboneError, BackboneConfigError, StoreError,
             SettingsError, FileNotFoundError, IndexSpecError, RecipeError)
    while e is not None:
        if isinstance(e, kinds):
            return e
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return write_failure(e)
        e = e.__cause__
    return None


QUIET_LOGGERS = ("faiss", "PIL", "matplotlib", "urllib3", "filelock", "huggingface_hub")
"""Third-party loggers kept at WARNING (faiss logs six lines per process about which library it loaded)."""


class QuietRoot(logging.Filter):
    """Drop INFO and DEBUG records of the root logger: fewclip never logs there, open_clip does (a dozen lines per
    model built). Used by the job log file (``conf/hydra/job_logging/fewclip.yaml``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root" or record.levelno >= logging.WARNING


# Settings a user must give for some options: what the missing value error should say.
MISSING_HINTS = {
    "backbone.model": "backbone=open_clip needs backbone.model=ARCH (e.g. ViT-B-32; open_clip.list_models() lists "
                      "them) and backbone.pretrained=TAG or a weights file, or "
                      "backbone.model=local-dir:/path/to/folder",
}


def config_error(e: BaseException, any_omegaconf: bool = False) -> str | None:
    """One line for a config error: Hydra's composition errors (a bad override, an unknown option, a value of the
    wrong type) and a missing mandatory value; with ``any_omegaconf`` (errors raised before a job started, while
    Hydra resolves the output folder) every OmegaConf error. None for anything else, including errors raised
    inside a ``_target_`` (``InstantiationException``: see ``user_error``)."""
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(e, (HydraException, OmegaConfBaseException)) or isinstance(e, InstantiationException):
        return None
    missing = re.search(r"Missing mandatory value: ([\w.]+)", f"{e}\n{e.__cause__}")
    if missing:
        key = missing.group(1)
        return f"{key} is not set: {MISSING_HINTS.get(key, f'pass {key}=VALUE')}"
    if isinstance(e, OmegaConfBaseException) and not any_omegaconf:
        return None
    text = str(e)
    if e.__cause__ is not None and str(e.__cause__) not in text:
        text += "\n" + str(e.__cause__)
    # One line: Hydra's indented lists ("Available options in 'adapter':" then one option per line) are joined
    # with commas, the other lines with semicolons.
    out: list[str] = []
    listing = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("object_type="):
            continue
        if line.startswith("Config search path"):  # where Hydra looked: not the user's concern
            break
        if listing and raw[:1] in ("\t", " "):
            out[-1] += (" " if out[-1].endswith(":") else ", ") + line
            continue
        listing = line.endswith(":")
        out.append(line)
    return "; ".join(out)


def error_line(e: BaseException) -> str | None:
    """The one line a command prints for bad input behind ``e`` (a config error, a missing dataset or weights
    file, a damaged store), or None when ``e`` is a bug (which keeps its traceback)."""
    if (msg := config_error(e)) is not None:
        return msg
    err = user_error(e)
    return None if err is None else str(err).strip()


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
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def fmt_hparams(hp: dict[str, Any]) -> str:
    """``alpha=1.17, beta=5.5`` for a run's chosen hyperparameters; ``-`` when there are none."""
    if not hp:
        return "-"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())
