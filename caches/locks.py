"""Inter-process file locks, so that concurrent sweep jobs never build the same store twice.

A job that needs a store another job is building waits on the lock, then finds the finished store and loads
it. The locks are advisory ``flock`` locks on small ``*.lock`` files next to the stores; they are released by
the kernel when a job dies, so a killed job never leaves a store locked. ``flock`` works on local disks and on
most cluster file systems (NFSv4, Lustre, GPFS with their usual mount options); where it is not available
(Windows), jobs run unlocked and a warning says so: stores are still written atomically, so the worst case is
the same store built twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_warned = False


@contextmanager
def file_lock(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the duration of the block."""
    global _warned
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        if not _warned:
            log.warning("file locks are not available on this platform: concurrent jobs may build a store twice")
            _warned = True
        yield
        return
    with open(p, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t = time.perf_counter()
            log.info("waiting for another job to finish %s", what or p.stem)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            log.info("lock on %s acquired after %.1f s", what or p.stem, time.perf_counter() - t)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
