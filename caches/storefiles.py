"""The files of a feature store: written with their sha256 in the same pass, fsynced, and checked against the
records of ``manifest.json`` (size and modification time by default, every byte on demand); the manifest's own
digest and fingerprint; write failures (disk full, read-only) as one line. ``caches.store.KVStore`` is built on
these; the format is described in ``caches/FORMAT.md``.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caches.weights_id import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
LEGACY_VERSIONS = (1,)  # still readable (full sha256 on every load), never written: e.g. stores inside artifacts
MANIFEST = "manifest.json"
KEYS = "keys.faiss"
EXACT_KEYS = "keys.npy"  # beside an index whose codes are lossy (PQ, SQ): keys() must stay exact
VALUES = "values.npy"
VIEWS = "views.npy"
VIEW_ROWS = "view_rows.npy"
META = "meta.csv"
INDEX_TYPE = "IndexFlatIP"  # the class of a Flat index, the default (and format 1's only) type
DIGEST_FIELD = "manifest_sha256"
# Manifest fields every store has; anything else (e.g. ``skipped``) came in through ``write(extra=...)``.
BASE_FIELDS = ("format_version", "fingerprint", "spec", "n", "dim", "views", "index", "files", "versions",
               "created_at", "bank_views", DIGEST_FIELD)

# errno values meaning "this directory cannot be written": reported as one line, never a traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})

_BLOCK = 1 << 24  # bytes hashed / written per call


class StoreError(RuntimeError):
    """A store is missing, incomplete, corrupt or was produced by different settings."""


class CacheWriteError(StoreError):
    """The cache directory cannot be written: disk full, read-only file system, or no permission."""


def write_error(e: OSError, where: str | os.PathLike) -> CacheWriteError:
    """One line saying what could not be written, why, and what to do."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    name = errno.errorcode.get(e.errno or 0, "?")
    hint = ("free some space or set cache_dir= to another disk" if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "set cache_dir= to a writable directory (a read-only cache works when every store the run "
                 "needs is already built)")
    return CacheWriteError(f"cannot write the feature cache at {where}: {reason} ({name}); {hint}")


@contextmanager
def cache_writes(where: str | os.PathLike) -> Iterator[None]:
    """Turn 'disk full / read-only / permission denied' while writing under ``where`` into ``CacheWriteError``."""
    try:
        yield
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(e, where) from e
        raise


def fingerprint(spec: dict[str, Any], version: int = FORMAT_VERSION) -> str:
    """Short content address of a store: sha256 of the canonical JSON of its spec."""
    blob = json.dumps({"format_version": version, **spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def ids_digest(ids: Sequence[str]) -> str:
    """Short sha256 of an ordered list of sample ids (store specs name their rows by it)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def canonical_digest(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()




def store_versions() -> dict[str, str]:
    import faiss

    return {"torch": torch.__version__, "faiss": getattr(faiss, "__version__", "?"), "numpy": np.__version__}


# ---------------------------------------------------------------------------------------------- writing files
def write_blocks(path: Path, chunks: Iterator[memoryview | bytes]) -> dict[str, Any]:
    """Write ``chunks`` to ``path``, hashing the same bytes on the way (one pass); fsync before returning.

    Returns the file's manifest record: ``sha256``, ``size``, ``mtime_ns``.
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:
        for block in chunks:
            h.update(block)
            f.write(block)
            size += len(block)
        f.flush()
        os.fsync(f.fileno())
    st = os.stat(path)
    if st.st_size != size:
        raise OSError(errno.EIO, f"short write: {st.st_size} of {size} bytes", str(path))
    return {"sha256": h.hexdigest(), "size": size, "mtime_ns": st.st_mtime_ns}


def npy_blocks(arr: np.ndarray) -> Iterator[memoryview | bytes]:
    """The ``.npy`` encoding of a C-contiguous numeric array: header, then the raw bytes without copying."""
    if arr.dtype.hasobject:
        raise ValueError("object arrays are never written (no pickles)")
    arr = np.ascontiguousarray(arr)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    yield header.getvalue()
    flat = memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")
    for start in range(0, len(flat), _BLOCK):
        yield flat[start:start + _BLOCK]


def csv_text(rows: Sequence[dict[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """``meta.csv`` text and the rows as ``csv.DictReader`` would read them back (strings)."""
    out = io.StringIO(newline="")
    fields = ["row", *([k for k in rows[0] if k != "row"] if rows else [])]
    w = csv.DictWriter(out, fieldnames=fields, lineterminator="\r\n")
    w.writeheader()
    read_back: list[dict[str, str]] = []
    for i, r in enumerate(rows):
        row = {"row": i, **{k: v for k, v in r.items() if k != "row"}}
        w.writerow(row)
        read_back.append({k: "" if row.get(k) is None else str(row.get(k)) for k in fields})
    return out.getvalue(), read_back


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported here (e.g. Windows): the data files themselves were synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- manifests
def read_manifest(d: Path) -> dict[str, Any]:
    """Parse ``d/manifest.json`` and check what can be checked from it alone: format version, its own
    digest (format 2: any edited field is caught), and its fingerprint against its spec."""
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise StoreError(f"{d}: no {MANIFEST} (missing or interrupted build)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{d}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise StoreError(f"{d}: manifest is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION and version not in LEGACY_VERSIONS:
        raise StoreError(f"{d}: store format version {version} is not readable by this fewclip "
                         f"(it writes version {FORMAT_VERSION}); the store is rebuilt")
    if version == FORMAT_VERSION:
        body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
        if manifest.get(DIGEST_FIELD) != canonical_digest(body):
            raise StoreError(f"{d}: {MANIFEST} was edited or is corrupt (its {DIGEST_FIELD} does not match "
                             "its content)")
    spec = manifest.get("spec")
    if not isinstance(spec, dict) or manifest.get("fingerprint") != fingerprint(spec, version):
        raise StoreError(f"{d}: manifest fingerprint does not match its spec (edited or corrupt)")
    return manifest


def file_record(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    rec = manifest.get("files", {}).get(name)
    if rec is None:
        raise StoreError(f"manifest lists no {name}")
    return rec if isinstance(rec, dict) else {"sha256": rec}  # format 1 recorded the sha256 alone


def check_file(d: Path, name: str, rec: dict[str, Any], full: bool = False) -> None:
    """Check one file of a store against its manifest record.

    Size and mtime by default; the full sha256 when ``full``, when the record has no stamp (format 1), or when
    the mtime differs (then, if the content matches, the recorded mtime is put back so the next load is cheap).
    Raises:
        StoreError: with the recorded and found figures.
    """
    f = d / name
    try:
        st = f.stat()
    except FileNotFoundError:
        raise StoreError(f"{d}: missing file {name}") from None
    size = rec.get("size")
    if size is not None and st.st_size != size:
        raise StoreError(f"{d}: {name} has {st.st_size} bytes, the manifest says {size} (corrupt or modified)")
    stamped = size is not None and st.st_mtime_ns == rec.get("mtime_ns")
    if full or not stamped:
        digest = sha256_file(f, _BLOCK)
        if digest != rec.get("sha256"):
            raise StoreError(f"{d}: checksum mismatch for {name} (sha256 {digest[:16]}..., manifest "
                             f"{str(rec.get('sha256'))[:16]}...; corrupt or modified)")
        if size is not None and not stamped:
            log.info("%s/%s: modification time changed, content verified by sha256", d, name)
            try:  # best effort: a read-only cache keeps working, it just hashes again next time
                os.utime(f, ns=(st.st_atime_ns, rec["mtime_ns"]))
            except (OSError, KeyError):
                pass
