"""Progress of long stages: a bar on a terminal, a log line at the start and the end of the stage otherwise.

A bar written into a redirected log becomes one line of thousands of carriage-return updates; a job log wants
``encoding support digits: 1600 img`` and ``... done in 3.2 s`` instead.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def on_terminal() -> bool:
    """True when stderr (where bars go) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class Progress(tqdm):
    """``tqdm`` whose ``enabled`` is tri-state: True shows the bar, False hides it, None (the default) shows it
    only on a terminal. Without a bar the stage logs one INFO line when it starts and one when it closes."""

    def __init__(self, *args: Any, enabled: bool | None = None, logger: logging.Logger | None = None,
                 **kwargs: Any) -> None:
        show = on_terminal() if enabled is None else bool(enabled)
        kwargs["disable"] = not show
        super().__init__(*args, **kwargs)
        # A disabled tqdm keeps neither desc nor unit: the stage line reads them from the arguments.
        self._stage = str(kwargs.get("desc") or "stage")
        self._stage_log = None if show else (logger or log)
        self._stage_start = time.perf_counter()
        if self._stage_log is not None:
            total = kwargs.get("total")
            if total is None and args and hasattr(args[0], "__len__"):
                total = len(args[0])
            size = f": {total} {kwargs.get('unit', 'it')}" if total is not None else ""
            self._stage_log.info("%s%s", self._stage, size)

    def close(self) -> None:
        if getattr(self, "_stage_log", None) is not None:
            self._stage_log.info("%s: done in %.1f s", self._stage, time.perf_counter() - self._stage_start)
            self._stage_log = None
        super().close()
