"""DataLoader workers that die with the process that started them.

A worker forked by a job that is then killed (SIGKILL, out-of-memory killer, a cluster's time limit) would
otherwise run on until torch's own watchdog notices, seconds later, or until the image it is decoding is done.
On Linux each worker asks the kernel for SIGKILL when its parent exits (``prctl(PR_SET_PDEATHSIG)``), then
checks that the parent has not already gone between the fork and that call; elsewhere a daemon thread polls
the parent pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any

_PR_SET_PDEATHSIG = 1


class DieWithParent:
    """``worker_init_fn`` for DataLoaders: the worker exits as soon as ``parent_pid`` does (picklable)."""

    def __init__(self, parent_pid: int | None = None, poll_s: float = 0.5) -> None:
        self.parent_pid = os.getpid() if parent_pid is None else parent_pid
        self.poll_s = poll_s

    def __call__(self, worker_id: int) -> None:
        if sys.platform.startswith("linux") and _set_parent_death_signal():
            if os.getppid() != self.parent_pid:  # the parent died before the signal was armed
                os._exit(1)
            return
        threading.Thread(target=self._watch, name="fewclip-parent-watch", daemon=True).start()

    def _watch(self) -> None:
        import time

        while os.getppid() == self.parent_pid:
            time.sleep(self.poll_s)
        os._exit(1)


def _set_parent_death_signal() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def loader_options(num_workers: int) -> dict[str, Any]:
    """Keyword arguments for a ``DataLoader`` with ``num_workers`` workers: they die with this process."""
    return {"worker_init_fn": DieWithParent()} if num_workers > 0 else {}
