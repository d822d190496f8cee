"""Faults around the cache: killed jobs, stale and contended locks, full disks, read-only cache directories."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from caches.builder import CacheBuilder
from caches.data.datasets import load_digits
from caches.locks import HOST, file_lock
from caches.storefiles import CacheWriteError

T = ["a photo of a {}."]
ROOT = Path(__file__).parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and POSIX signals")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped


def _can_lock_now(path: Path) -> bool:
    import fcntl

    with open(path, "a+") as f:
        try:
            fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.lockf(f.fileno(), fcntl.LOCK_UN)
        return True


_HOLD = """
import sys, time
from caches.locks import file_lock
with file_lock(sys.argv[1], what="support-xyz"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@linux_only
def test_a_waiting_job_names_the_lock_holder(tmp_path, caplog):
    lock = tmp_path / ".support-xyz.lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock), "2"], stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = time.perf_counter()
        with caplog.at_level("INFO", logger="caches.locks"), file_lock(lock, what="support-xyz", poll_s=0.05):
            waited = time.perf_counter() - t
        assert f"pid {holder.pid} on host {HOST}" in caplog.text and "support-xyz" in caplog.text
        assert waited > 0.5
    finally:
        holder.kill()
        holder.wait()


_STALE = """
import fcntl, json, sys, time
f = open(sys.argv[1], "a+")
fcntl.lockf(f.fileno(), fcntl.LOCK_EX)
f.truncate(0)
f.write(json.dumps({"pid": int(sys.argv[2]), "host": sys.argv[3], "started": time.time() - 60, "what": "x"}))
f.flush()
print("locked", flush=True)
time.sleep(60)
"""


@linux_only
def test_a_lock_recorded_for_a_dead_process_is_taken_over(tmp_path, caplog):
    """The lock is held (by a process that did not record itself) while the recorded holder is dead."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".bank.lock"
    orphan = subprocess.Popen([sys.executable, "-c", _STALE, str(lock), str(dead.pid), HOST],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline().strip() == "locked"
        t = time.perf_counter()
        with caplog.at_level("WARNING", logger="caches.locks"), file_lock(lock, what="bank", stale_grace_s=0.2):
            took = time.perf_counter() - t
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert took < 10 and "stale lock on bank" in caplog.text and f"pid {dead.pid}" in caplog.text
    finally:
        orphan.kill()
        orphan.wait()


def test_threads_of_one_process_exclude_each_other(tmp_path):
    inside, overlap = [], []

    def work():
        with file_lock(tmp_path / ".x.lock", poll_s=0.01):
            if inside:
                overlap.append(True)
            inside.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert overlap == []


_KILLED_BUILD = """
import sys, time
from caches.backbone import FrozenClip
from caches.builder import CacheBuilder
from caches.data.datasets import load_folder
ds = load_folder(sys.argv[2], ["a photo of a {}."])
original = type(ds).load_image
def slow(self, s):  # decoding that takes long: the workers are busy when their parent is killed
    time.sleep(60)
    return original(self, s)
type(ds).load_image = slow
b = CacheBuilder(FrozenClip("fewclip-tiny", None, device="cpu"), sys.argv[1], batch_size=2, num_workers=2,
                 progress=False)
b.features(ds, "test", ds.splits["test"])
"""


@linux_only
def test_killed_job_leaves_no_workers_and_no_lock(tmp_path, class_folder):
    """SIGKILL a job while its DataLoader workers decode: they die with it and the bank lock is free at once."""
    job = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(tmp_path / "cache"), str(class_folder)],
                           env=_env())
    try:
        deadline = time.time() + 120
        while len(_children(job.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        workers = _children(job.pid)
        assert len(workers) >= 2, "the job did not start its DataLoader workers"
        time.sleep(1.0)  # the workers are inside the 60 s decode
        locks = list((tmp_path / "cache").glob("*/*/.bank-eval-*.lock"))
        assert len(locks) == 1 and not _can_lock_now(locks[0])
        job.kill()
        job.wait()
        deadline = time.time() + 5
        while any(_running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_running(w) for w in workers), "DataLoader workers outlived the killed job"
        assert _can_lock_now(locks[0])
    finally:
        job.kill()
        for w in _children(job.pid):
            os.kill(w, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- write errors
@contextmanager
def read_only(root: Path, code: int = errno.EROFS):
    """Every write under ``root`` fails with ``code`` (EROFS: a read-only file system), as the OS would say.

    Tests run as root here, where chmod does not stop writes, so the write calls are intercepted instead:
    opening for writing, creating, renaming, deleting and re-timing files and directories.
    """
    root = os.path.realpath(root)

    def under(p) -> bool:
        try:
            return os.path.realpath(os.fspath(p)).startswith(root)
        except TypeError:
            return False

    def fail(p):
        raise OSError(code, os.strerror(code), os.fspath(p))

    real = {"open": builtins.open, "os_open": os.open, "mkdir": os.mkdir, "rename": os.rename,
            "replace": os.replace, "unlink": os.unlink, "rmdir": os.rmdir, "utime": os.utime,
            "mkdtemp": tempfile.mkdtemp, "rmtree": shutil.rmtree, "save": np.save}

    def open_(file, mode="r", *a, **kw):
        if under(file) and any(c in mode for c in "wax+"):
            fail(file)
        return real["open"](file, mode, *a, **kw)

    def os_open(path, flags, *a, **kw):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            fail(path)
        return real["os_open"](path, flags, *a, **kw)

    def mkdir(path, *a, **kw):
        if under(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
            fail(path)
        return real["mkdir"](path, *a, **kw)

    def two(name):
        def f(src, dst, *a, **kw):
            if under(src) or under(dst):
                fail(dst)
            return real[name](src, dst, *a, **kw)
        return f

    def one(name):
        def f(path, *a, **kw):
            if under(path):
                fail(path)
            return real[name](path, *a, **kw)
        return f

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if dir is not None and under(dir):
            fail(dir)
        return real["mkdtemp"](suffix, prefix, dir)

    patches = [(builtins, "open", open_), (io, "open", open_), (os, "open", os_open), (os, "mkdir", mkdir),
               (os, "rename", two("rename")), (os, "replace", two("replace")), (os, "unlink", one("unlink")),
               (os, "remove", one("unlink")), (os, "rmdir", one("rmdir")), (os, "utime", one("utime")),
               (tempfile, "mkdtemp", mkdtemp), (shutil, "rmtree", one("rmtree")), (np, "save", one("save"))]
    saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
    try:
        for m, n, f in patches:
            setattr(m, n, f)
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


def test_disk_full_while_building_is_one_clear_error_and_leaves_nothing_behind(tmp_path, tiny, monkeypatch):
    import caches.store as store_module

    ds = load_digits(T)
    real = store_module.write_blocks
    state = {"n": 0}

    def full_disk(path, blocks):
        state["n"] += 1
        if state["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, blocks)

    monkeypatch.setattr(store_module, "write_blocks", full_disk)
    b = CacheBuilder(tiny, tmp_path, progress=False)
    with pytest.raises(CacheWriteError, match=r"No space left on device \(ENOSPC\); free some space"):
        b.features(ds, "val", ds.splits["val"][:10])
    assert not list(tmp_path.rglob(".*.tmp-*")) and not list(tmp_path.rglob("manifest.json"))


def test_a_cold_store_in_a_read_only_cache_is_one_clear_error(tmp_path, tiny):
    ds = load_digits(T)
    (tmp_path / "cache").mkdir()
    with read_only(tmp_path / "cache"), pytest.raises(CacheWriteError, match="Read-only file system"):
        CacheBuilder(tiny, tmp_path / "cache", progress=False).text(ds)


def test_warm_builds_write_nothing(tmp_path, tiny):
    ds = load_digits(T)
    b = CacheBuilder(tiny, tmp_path / "cache", progress=False)
    first = [b.text(ds), b.support(ds, ds.splits["train"][:20], 2, 1, views=2),
             b.features(ds, "val", ds.splits["val"][:10])]
    with read_only(tmp_path / "cache"):
        again = [b.text(ds), b.support(ds, ds.splits["train"][:20], 2, 1, views=2),
                 b.features(ds, "val", ds.splits["val"][:10])]
    assert [s.fingerprint for s in again] == [s.fingerprint for s in first]
    assert np.array_equal(again[1].view_features().numpy(), first[1].view_features().numpy())


def test_a_store_that_fails_verification_in_a_read_only_cache_says_so(tmp_path, tiny):
    ds = load_digits(T)
    store = CacheBuilder(tiny, tmp_path / "cache", progress=False).text(ds)
    (store.path / "keys.faiss").write_bytes(b"garbage")
    with read_only(tmp_path / "cache"), pytest.raises(CacheWriteError, match="Read-only"):
        CacheBuilder(tiny, tmp_path / "cache", progress=False).text(ds)


def test_a_warm_run_works_in_a_read_only_cache(tmp_path):
    """Every store warm: the run reads the cache and writes only its own output (the few-shot id file, which
    is already there with the same content, is left alone)."""
    from fewclip.config import compose
    from fewclip.runner import run

    def cfg():
        return compose([f"cache_dir={tmp_path / 'cache'}", "progress=false", "device=cpu", "adapter=tip",
                        "shots=2", "views=2", "adapter.beta_steps=3", "adapter.alpha_steps=3"])

    first = run(cfg(), out_dir=tmp_path / "out1")
    with read_only(tmp_path / "cache"):
        again = run(cfg(), out_dir=tmp_path / "out2")
    assert again["cache_activity"]["built"] == [] and again["test_acc"] == first["test_acc"]


# ---------------------------------------------------------------------------------------------- the CLI
_INTERCEPTED = """
import errno, sys
sys.path.insert(0, sys.argv[1])
from test_store_faults import read_only
from fewclip.cli import main
with read_only(sys.argv[2], getattr(errno, sys.argv[3])):
    rc = main(sys.argv[4:])
sys.exit(rc)
"""


def _fewclip_with_failing_writes(tmp_path: Path, root: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """``fewclip ARGS`` in a subprocess where every write under ``root`` fails with errno ``code``."""
    return subprocess.run([sys.executable, "-c", _INTERCEPTED, str(Path(__file__).parent), str(root), code, *args],
                          cwd=tmp_path, env={**_env(), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, p.stderr
    return errors[0]


@pytest.mark.parametrize("code,target,phrase", [
    ("ENOSPC", "cache", "cannot write the feature cache at {cache}/fewshot/digits: No space left on device (ENOSPC)"),
    ("EROFS", "cache", "Read-only file system (EROFS); set cache_dir= to a writable directory"),
    ("EACCES", "cache", "Permission denied (EACCES)"),
    ("ENOSPC", "result", "cannot write {run}/.result.json.tmp"),
])
def test_cli_write_failures_are_one_line_and_exit_2(tmp_path, code, target, phrase):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    (cache / "fewshot" / "digits").mkdir(parents=True)
    root = cache if target == "cache" else run_dir / ".result.json"
    p = _fewclip_with_failing_writes(tmp_path, root, code, "run", f"cache_dir={cache}", "adapter=zero_shot",
                                     "shots=1", "views=1", "progress=false", "device=cpu",
                                     f"hydra.run.dir={run_dir}")
    assert p.returncode == 2, p.stderr
    assert phrase.format(cache=cache, run=run_dir) in _one_error_line(p)
    if target == "cache":  # nothing half-written is left
        assert not list(cache.rglob("manifest.json")) and not list(cache.rglob(".*.tmp-*"))
    else:
        assert not (run_dir / "result.json").exists() and (run_dir / "error.json").is_file()


def test_cache_verify(tmp_path, tiny):
    from fewclip.cache import main as cache_main

    ds = load_digits(T)
    b = CacheBuilder(tiny, tmp_path / "cache", progress=False)
    support = b.support(ds, ds.splits["train"][:20], 2, 1, views=2)
    b.features(ds, "val", ds.splits["val"][:10])
    proc = subprocess.run([sys.executable, "-m", "fewclip", "cache", "verify", str(tmp_path / "cache")],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    n_stores = len(list((tmp_path / "cache").rglob("manifest.json")))
    assert f"{n_stores} stores under" in proc.stdout and "0 damaged" in proc.stdout and n_stores >= 4
    # a flipped byte that keeps size and mtime: invisible to a load, found here with the figures
    (chunk,) = [tmp_path / "cache" / "tiny" / "digits" / support.manifest["bank_views"]["bank"] / c["name"]
                for c in support.manifest["bank_views"]["chunks"]]
    target = chunk / "views.npy"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x55
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc = subprocess.run([sys.executable, "-m", "fewclip", "cache", "verify", str(tmp_path / "cache")],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    damaged = [line for line in proc.stdout.splitlines() if line.startswith("DAMAGED")]
    # the chunk, and the support store whose views it holds
    assert len(damaged) == 2 and "2 damaged" in proc.stdout
    assert any(line.startswith(f"DAMAGED {chunk}: ") and "checksum mismatch for views.npy" in line
               for line in damaged)
    assert any(line.startswith(f"DAMAGED {support.path}: ") and chunk.name in line for line in damaged)
    assert cache_main(["verify", str(tmp_path / "nowhere")]) == 2
