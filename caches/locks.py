"""Inter-process file locks, so that concurrent sweep jobs never build the same store twice.

A job that needs a store another job is building waits on the lock, then finds the finished store and loads
it. The locks are POSIX record locks (``fcntl.lockf``) on small ``*.lock`` files next to the stores:

* the kernel releases them when the holding process dies, and they are **not inherited** by processes it
  forks (DataLoader workers), so a killed job never leaves a store locked behind it;
* the holder writes its pid, host and start time into the lock file, and a waiting job says who it waits for;
* a lock whose recorded holder is a dead process on this host, yet is still held (by some process that
  inherited it some other way), is stale: it is taken over with a warning (the lock file is replaced; a job
  that was waiting on the old file notices and waits on the new one);
* POSIX locks work on local disks and on NFS (through its lock manager), Lustre and GPFS with their usual mount
  options. Where locks are not available (Windows, a file system without lock support), jobs run unlocked and a
  warning says so: stores are still written atomically, so the worst case is the same store built twice.

POSIX locks belong to a process, not to a thread, so threads of one process also take a per-path
``threading.Lock`` first.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from caches.store import cache_writes

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

HOST = socket.gethostname()
_warned = False
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written into the lock file."""

    pid: int
    host: str
    started: float  # time.time() when the lock was taken
    what: str = ""

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"pid {self.pid} on host {self.host}, since {since} ({time.time() - self.started:.0f} s ago)"


def read_holder(path: str | os.PathLike) -> Holder | None:
    """The holder recorded in a lock file, or None (free, never used, or written by an older fewclip)."""
    try:
        data = json.loads(Path(path).read_text() or "null")
        return Holder(int(data["pid"]), str(data["host"]), float(data["started"]), str(data.get("what", "")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _thread_lock(p: Path) -> threading.Lock:
    key = os.path.abspath(p)
    with _thread_locks_guard:
        return _thread_locks.setdefault(key, threading.Lock())


def _try_lock(f: IO[str]) -> bool:
    try:
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def _same_file(f: IO[str], p: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(p).st_ino
    except FileNotFoundError:
        return False


def _acquire(p: Path, label: str, stale_grace_s: float, poll_s: float) -> IO[str]:
    """Open ``p`` and lock it, waiting (and saying for whom) while another process holds it."""
    t0 = time.perf_counter()
    announced: Holder | None = None
    next_note = 0.0
    while True:
        with cache_writes(p.parent):
            f = open(p, "a+")
        if not _try_lock(f):
            holder = read_holder(p)
            if holder is not None and holder.host == HOST and not pid_alive(holder.pid):
                # The recorded holder is dead, yet the lock is held. Give a job that has just taken the lock a
                # moment to write its own name, then check again.
                time.sleep(stale_grace_s)
                if not _try_lock(f) and read_holder(p) == holder:
                    log.warning("stale lock on %s: its holder (%s) is dead but the lock is still held; taking "
                                "it over", label, holder.describe())
                    f.close()
                    with cache_writes(p.parent):
                        try:
                            os.unlink(p)
                        except FileNotFoundError:
                            pass
                    continue
                f.close()
                continue
            waited = time.perf_counter() - t0
            if holder != announced or waited >= next_note:
                who = holder.describe() if holder is not None else "another job (holder not recorded)"
                log.info("waiting for %s: another job is building it (%s)", label, who)
                announced, next_note = holder, waited + 60.0
            f.close()
            time.sleep(poll_s)
            continue
        if not _same_file(f, p):  # the file was replaced (a stale lock taken over) while we waited on the old one
            fcntl.lockf(f.fileno(), fcntl.LOCK_UN)
            f.close()
            continue
        if announced is not None:
            log.info("lock on %s acquired after %.1f s", label, time.perf_counter() - t0)
        return f


@contextmanager
def file_lock(path: str | os.PathLike, what: str = "", stale_grace_s: float = 1.0,
              poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the duration of the block.

    Args:
        path: the lock file.
        what: what is being built (for messages).
        stale_grace_s: how long a dead recorded holder must go on holding the lock before it is taken over.
        poll_s: how often a waiting job retries.
    Raises:
        CacheWriteError: the lock file cannot be created (read-only cache directory, disk full).
    """
    global _warned
    p = Path(path)
    label = what or p.stem
    with cache_writes(p.parent):
        p.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock(p):
        if fcntl is None:
            if not _warned:
                log.warning("file locks are not available on this platform: concurrent jobs may build a store twice")
                _warned = True
            yield
            return
        try:
            f = _acquire(p, label, stale_grace_s, poll_s)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            log.warning("file locks are not supported where %s lives (%s): concurrent jobs may build %s twice",
                        p, os.strerror(e.errno), label)
            yield
            return
        try:
            with cache_writes(p.parent):
                f.seek(0)
                f.truncate()
                f.write(json.dumps({"pid": os.getpid(), "host": HOST, "started": time.time(), "what": label}))
                f.flush()
            yield
        finally:
            try:
                f.truncate(0)
                f.flush()
            except OSError:
                pass
            fcntl.lockf(f.fileno(), fcntl.LOCK_UN)
            f.close()
