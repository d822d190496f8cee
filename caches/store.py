"""On-disk key-value stores of CLIP features (the format is described in ``caches/FORMAT.md``).

A store is a directory: ``manifest.json`` + ``keys.faiss`` (inner-product index over float32 L2-normalised
keys, of the type the spec's ``index`` factory string names, ``Flat`` when absent) + ``keys.npy`` (the exact keys,
only when that index compresses them: PQ, SQ) + ``values.npy`` (int64 labels) + ``meta.csv`` + either ``views.npy``
(per-view features) or ``view_rows.npy`` (where in the feature bank its per-view features are: support stores do
not copy them). Its name ends in the fingerprint of everything that produced it.

Verification has two levels:

* **stat** (every load): the manifest is intact (its own digest), its fingerprint matches its spec and the
  caller's, every file has the recorded size and modification time, and the row counts, dimension, view count
  and index type recorded in the manifest agree with the files. A file whose size agrees but whose mtime does
  not (copied without preserving times, touched) is hashed in full; it is accepted when its sha256 matches.
* **full** (when a file is written, ``verify_tree`` / ``fewclip cache verify``, and on an mtime mismatch):
  the sha256 of every byte.

``write`` builds in a temporary directory renamed into place, hashing the bytes as they are written (no second
pass), so an interrupted build never looks like a valid store. The file-level rules (writing with the sha256,
checking a file against its record, the manifest's digest) are ``caches.storefiles``'.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caches.search import DEFAULT_INDEX, KeyIndex, build_index, index_kind, reconstruct_exact
from caches.storefiles import (
    BASE_FIELDS,
    DIGEST_FIELD,
    EXACT_KEYS,
    FORMAT_VERSION,
    INDEX_TYPE,
    KEYS,
    LEGACY_VERSIONS,
    MANIFEST,
    META,
    VALUES,
    VIEW_ROWS,
    VIEWS,
    StoreError,
    cache_writes,
    canonical_digest,
    check_file,
    csv_text,
    file_record,
    fingerprint,
    fsync_dir,
    ids_digest,
    npy_blocks,
    read_manifest,
    store_versions,
    write_blocks,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- bank rows
@dataclass(frozen=True)
class ChunkRef:
    """A bank chunk store whose ``views.npy`` holds rows of a store (recorded in that store's manifest)."""

    name: str  # chunk directory name inside the bank directory
    fingerprint: str
    sha256: str  # of the chunk's views.npy, as its own manifest records it
    size: int

    @classmethod
    def of(cls, chunk: KVStore) -> ChunkRef:
        rec = file_record(chunk.manifest, VIEWS)
        return cls(chunk.path.name, chunk.fingerprint, rec["sha256"], int(rec["size"]))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class BankRows:
    """Where a store's per-view features live in a feature bank, instead of a copy in the store.

    Attributes:
        bank: the bank directory; a sibling of the store (same ``<cache>/<backbone>/<dataset>/`` folder).
        chunks: the chunk stores referenced.
        rows: ``[N, 2]`` int64: (index into ``chunks``, row in that chunk) of each store row.
    """

    bank: Path
    chunks: tuple[ChunkRef, ...]
    rows: np.ndarray


def _open_bank_views(store_dir: Path, record: dict[str, Any], n: int, a: int, dim: int,
                     rows: np.ndarray, full: bool = False) -> list[Path]:
    """Check the bank chunks a store references and return their ``views.npy`` paths (not read yet)."""
    bank = store_dir.parent / str(record.get("bank", ""))
    chunks = record.get("chunks") or []
    if rows.shape != (n, 2) or rows.dtype != np.int64:
        raise StoreError(f"{store_dir}: {VIEW_ROWS} is {rows.shape} {rows.dtype}, expected ({n}, 2) int64")
    if n and (rows[:, 0].min() < 0 or rows[:, 0].max() >= len(chunks)):
        raise StoreError(f"{store_dir}: {VIEW_ROWS} names chunks outside the {len(chunks)} recorded")
    paths = []
    for i, ref in enumerate(chunks):
        cdir = bank / str(ref.get("name"))
        try:
            cman = read_manifest(cdir)
        except StoreError as e:
            raise StoreError(f"{store_dir}: its views live in bank chunk {cdir.name}, which is missing or "
                             f"damaged ({e})") from e
        rec = cman.get("files", {}).get(VIEWS) or {}
        if cman.get("fingerprint") != ref.get("fingerprint") or rec.get("sha256") != ref.get("sha256") \
                or rec.get("size") != ref.get("size"):
            raise StoreError(f"{store_dir}: bank chunk {cdir.name} is not the one this store was built from")
        check_file(cdir, VIEWS, rec, full=full)
        arr = np.load(cdir / VIEWS, mmap_mode="r")
        shape = arr.shape
        if len(shape) != 3 or shape[0] != a or shape[2] != dim or arr.dtype != np.float32:
            raise StoreError(f"{store_dir}: bank chunk {cdir.name} holds views {shape} {arr.dtype}, expected "
                             f"[{a}, *, {dim}] float32")
        mine = rows[rows[:, 0] == i, 1]
        if len(mine) and (mine.min() < 0 or mine.max() >= shape[1]):
            raise StoreError(f"{store_dir}: {VIEW_ROWS} points past the {shape[1]} rows of chunk {cdir.name}")
        paths.append(cdir / VIEWS)
    return paths


def gather_rows(sources: Sequence[Path | np.ndarray], rows: np.ndarray, a: int, dim: int) -> np.ndarray:
    """``[A, N, D]`` float32: row ``rows[i, 1]`` of source ``rows[i, 0]`` for each store row ``i``.

    A source is a chunk's ``[A, n, D]`` array or the path of its ``views.npy`` (memory-mapped: only the rows
    taken are read).

    Runs of consecutive rows are copied as slices (a store built from fresh chunks is one run per chunk).
    """
    out = np.empty((a, len(rows), dim), dtype=np.float32)
    if not len(rows):
        return out
    # Split the store rows into runs where both the chunk and the row advance by one.
    brk = np.flatnonzero((np.diff(rows[:, 0]) != 0) | (np.diff(rows[:, 1]) != 1)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [len(rows)]])
    mmaps: dict[int, np.ndarray] = {}
    for s, e in zip(starts.tolist(), ends.tolist()):
        c = int(rows[s, 0])
        if c not in mmaps:
            src = sources[c]
            mmaps[c] = src if isinstance(src, np.ndarray) else np.load(src, mmap_mode="r")
        r0 = int(rows[s, 1])
        out[:, s:e] = mmaps[c][:, r0:r0 + (e - s)]
    return out


def _check_skipped(d: Path, manifest: dict[str, Any], meta: list[dict[str, str]]) -> None:
    """An eval store's ``skipped`` ids (unreadable images), put back at ``skipped_at`` among the stored rows'
    ids, must give exactly the ids the store was asked for (``spec["ids"]``)."""
    if "skipped" not in manifest:
        return
    skipped, at = manifest["skipped"], manifest.get("skipped_at")
    if not (isinstance(skipped, list) and isinstance(at, list) and len(at) == len(skipped)
            and all(isinstance(i, int) for i in at)):
        raise StoreError(f"{d}: the manifest's skipped / skipped_at lists are malformed")
    merged = [r.get("id", "") for r in meta]
    for pos, sid in sorted(zip(at, skipped)):
        merged.insert(pos, str(sid))
    if manifest["spec"].get("ids") != ids_digest(merged):
        raise StoreError(f"{d}: the manifest's skipped list ({len(skipped)} ids) and the {len(meta)} stored rows "
                         "do not make up the ids this store was built for (edited or corrupt manifest)")


# ---------------------------------------------------------------------------------------------- the store
class KVStore:
    """A loaded store: a faiss index over keys, int64 values, optional per-view features and row metadata.

    Use ``KVStore.write`` to create one and ``KVStore.load`` to open one.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], index: Any, values: np.ndarray,
                 views: np.ndarray | None, meta: list[dict[str, str]],
                 bank_views: tuple[list[Path], np.ndarray] | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.index = index
        self.values = values
        self._views = views
        self._bank_views = bank_views  # (chunk views.npy paths, [N, 2] rows), gathered on first use
        self.meta = meta
        self._exact_keys: np.ndarray | None = None  # keys.npy (memory-mapped) when the index compresses the keys

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def views(self) -> np.ndarray | None:
        """``[A, N, D]`` float32 per-view features (memory-mapped or gathered from the bank), or None."""
        if self._views is None and self._bank_views is not None:
            self._views = gather_rows(*self._bank_views, int(self.manifest["views"]), int(self.manifest["dim"]))
        return self._views

    @property
    def index_factory(self) -> str:
        """The faiss factory string of ``keys.faiss`` (``Flat`` unless the spec names another)."""
        return str(self.manifest["spec"].get("index", DEFAULT_INDEX))

    def keys(self) -> torch.Tensor:
        """``[N, D]`` float32 keys, exact: reconstructed from an index that stores them as they are (Flat, HNSW,
        IVF-Flat), or read from ``keys.npy`` beside one that compresses them (PQ, SQ)."""
        if self._exact_keys is not None:
            return torch.from_numpy(np.array(self._exact_keys))
        n = self.index.ntotal
        if n == 0:
            return torch.empty(0, self.index.d)
        return torch.from_numpy(self.index.reconstruct_n(0, n).copy())

    def labels(self) -> torch.Tensor:
        """``[N]`` int64 values."""
        return torch.from_numpy(self.values.copy())

    def view_features(self) -> torch.Tensor | None:
        """``[A, N, D]`` float32 per-view features (a fresh tensor), or None when the store has none."""
        if self._views is None and self._bank_views is not None:
            return torch.from_numpy(gather_rows(*self._bank_views, int(self.manifest["views"]),
                                                int(self.manifest["dim"])))
        return None if self._views is None else torch.from_numpy(np.array(self._views))

    @property
    def references_bank(self) -> bool:
        """True when the per-view features live in a feature bank (``copy_to`` makes a self-contained copy)."""
        return "bank_views" in self.manifest

    def searcher(self, params: str = "", use_gpu: bool = True) -> KeyIndex:
        """The keys' index, searchable (on every GPU, sharded, when faiss has GPU support and CUDA is present).

        Args:
            params: faiss search settings (``nprobe=64``, ``efSearch=256``); ``""`` for ``search.default_params``.
        """
        return KeyIndex(self.index, self.index_factory, params=params, use_gpu=use_gpu)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest keys by inner product: ``[B, D] -> ([B, k] scores, [B, k] row ids)`` (see ``searcher``)."""
        return self.searcher().search(queries, k)

    def copy_to(self, path: str | os.PathLike) -> KVStore:
        """A self-contained copy at ``path`` (same spec and fingerprint; per-view features copied in)."""
        extra = {k: v for k, v in self.manifest.items() if k not in BASE_FIELDS}
        return KVStore.write(path, self.manifest["spec"], self.keys(), self.labels(), views=self.view_features(),
                             meta=self.meta, extra=extra, index=self.index)

    # ------------------------------------------------------------------ writing
    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        spec: dict[str, Any],
        keys: torch.Tensor,
        values: torch.Tensor,
        views: torch.Tensor | None = None,
        meta: Sequence[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        bank_rows: BankRows | None = None,
        index: Any = None,
    ) -> KVStore:
        """Write a store atomically and return it (from memory: nothing is read back or hashed twice).

        Args:
            path: final directory; must not hold a valid store already (it is replaced otherwise).
            spec: everything that produced the store; its fingerprint is recorded and checked on load.
            keys: ``[N, D]`` float32, rows L2-normalised.
            values: ``[N]`` integer labels.
            views: optional ``[A, N, D]`` float32 per-view features. With ``bank_rows`` they are not written
                (the bank holds them); pass them anyway to keep them in the returned store.
            meta: optional rows (dicts with the same keys) for ``meta.csv``.
            extra: more manifest fields that are not part of the fingerprint (counts, timings).
            bank_rows: where the per-view features live in a feature bank (support stores).
            index: a faiss index over exactly these keys, built from ``spec["index"]`` (``copy_to`` passes its
                own); by default it is built here (and trained on the keys when the type needs it).
        Raises:
            CacheWriteError: the directory cannot be written (disk full, read-only, no permission).
            IndexSpecError: ``spec["index"]`` is not a factory string faiss can build on these keys.
        """
        import faiss

        final = Path(path)
        keys_np = np.ascontiguousarray(keys.detach().float().cpu().numpy())
        values_np = np.ascontiguousarray(values.detach().cpu().numpy().astype(np.int64))
        if keys_np.ndim != 2 or values_np.shape != (keys_np.shape[0],):
            raise ValueError(f"keys must be [N, D] and values [N]; got {keys_np.shape} and {values_np.shape}")
        n, dim = keys_np.shape
        if views is not None and (views.ndim != 3 or tuple(views.shape[1:]) != keys_np.shape):
            raise ValueError(f"views must be [A, N, D] = [A, {keys_np.shape}]; got {tuple(views.shape)}")
        views_np = None if views is None else np.ascontiguousarray(views.detach().float().cpu().numpy())
        extra = dict(extra or {})
        clash = set(extra) & set(BASE_FIELDS)
        if clash:
            raise ValueError(f"extra manifest fields {sorted(clash)} are reserved")
        bank_record = None
        n_views = 0 if views_np is None else views_np.shape[0]
        if bank_rows is not None:
            if bank_rows.bank.parent.resolve() != final.parent.resolve():
                raise ValueError(f"the bank {bank_rows.bank} must sit beside the store {final}")
            if bank_rows.rows.shape != (n, 2):
                raise ValueError(f"bank rows must be [N, 2] = [{n}, 2]; got {bank_rows.rows.shape}")
            if views_np is None:
                raise ValueError("pass the views with bank_rows (their count and dimension go into the manifest)")
            bank_record = {"bank": bank_rows.bank.name, "chunks": [c.as_dict() for c in bank_rows.chunks]}
        # meta.csv has a line per row even without metadata, so its row count can be checked on load.
        rows_text, meta_rows = csv_text(list(meta) if meta else [{} for _ in range(n)])
        factory = str(spec.get("index", DEFAULT_INDEX))
        if index is None:
            index = build_index(keys_np, factory)
        elif index.ntotal != n or index.d != dim:
            raise ValueError(f"the index holds {index.ntotal} x {index.d} keys, not {n} x {dim}")
        # An index that compresses the keys (PQ, SQ) cannot give them back: they are kept exactly beside it.
        exact_keys = None if reconstruct_exact(index, keys_np) else keys_np

        with cache_writes(final.parent):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            try:
                files = {
                    KEYS: write_blocks(tmp / KEYS, iter([memoryview(faiss.serialize_index(index))])),
                    VALUES: write_blocks(tmp / VALUES, npy_blocks(values_np)),
                    META: write_blocks(tmp / META, iter([rows_text.encode()])),
                }
                if exact_keys is not None:
                    files[EXACT_KEYS] = write_blocks(tmp / EXACT_KEYS, npy_blocks(exact_keys))
                if bank_rows is not None:
                    files[VIEW_ROWS] = write_blocks(tmp / VIEW_ROWS,
                                                     npy_blocks(bank_rows.rows.astype(np.int64)))
                elif views_np is not None:
                    files[VIEWS] = write_blocks(tmp / VIEWS, npy_blocks(views_np))
                manifest: dict[str, Any] = {
                    "format_version": FORMAT_VERSION,
                    "fingerprint": fingerprint(spec),
                    "spec": spec,
                    "n": int(n),
                    "dim": int(dim),
                    "views": int(n_views),
                    "index": index_kind(index),
                    "files": files,
                    "versions": store_versions(),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **({"bank_views": bank_record} if bank_record is not None else {}),
                    **extra,
                }
                manifest[DIGEST_FIELD] = canonical_digest(manifest)
                # The manifest is written last: a directory without one is never a store.
                write_blocks(tmp / MANIFEST, iter([json.dumps(manifest, indent=1, sort_keys=True).encode()]))
                fsync_dir(tmp)
                if final.exists():
                    # Another process finished the same store first, or a stale one sits here: keep a valid
                    # identical one, replace anything else.
                    try:
                        return cls.load(final, manifest["fingerprint"])
                    except StoreError:
                        shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_dir(final.parent)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        bank_views = None
        if bank_rows is not None:
            bank_views = ([bank_rows.bank / c.name / VIEWS for c in bank_rows.chunks], bank_rows.rows)
        store = cls(final, manifest, index, values_np, views_np, meta_rows, bank_views)
        store._exact_keys = exact_keys
        return store

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str | None = None, full: bool = False) -> KVStore:
        """Open a store and verify it (module docstring: size + mtime by default, sha256 with ``full``).

        Every manifest field is checked: its digest covers them all; the fingerprint is recomputed from the
        spec; ``n``, ``dim``, ``views`` and ``index`` must agree with the files.
        Raises:
            StoreError: when anything does not match; a store is never reused on a mismatch.
        """
        import faiss

        d = Path(path)
        manifest = read_manifest(d)
        fp = manifest["fingerprint"]
        if expected_fingerprint is not None and fp != expected_fingerprint:
            raise StoreError(f"{d}: fingerprint {fp} != expected {expected_fingerprint}: built from other settings")
        legacy = manifest["format_version"] != FORMAT_VERSION
        n, dim, a = manifest.get("n"), manifest.get("dim"), manifest.get("views", 0)
        if not all(isinstance(x, int) and x >= 0 for x in (n, dim, a)):
            raise StoreError(f"{d}: manifest n={n!r}, dim={dim!r}, views={a!r} are not counts")
        kind = manifest.get("index", INDEX_TYPE)
        if kind != INDEX_TYPE and "index" not in manifest["spec"]:
            raise StoreError(f"{d}: index type {kind!r}, but its spec names no index (expected {INDEX_TYPE})")
        bank_record = manifest.get("bank_views")
        required = [KEYS, VALUES, META] + ([VIEW_ROWS] if bank_record else [VIEWS] if a else [])
        listed = manifest.get("files")
        if not isinstance(listed, dict) or any(name not in listed for name in required):
            raise StoreError(f"{d}: the manifest's file list {sorted(listed or {})} lacks one of {required}")
        for name in listed:
            check_file(d, name, file_record(manifest, name), full=full or legacy)
        try:
            index = faiss.read_index(str(d / KEYS))
            values = np.load(d / VALUES, allow_pickle=False)
            with open(d / META, newline="") as f:
                meta = list(csv.DictReader(f))
        except (RuntimeError, ValueError, OSError, csv.Error, UnicodeDecodeError) as e:
            raise StoreError(f"{d}: unreadable store file ({e})") from e
        if index_kind(index) != kind or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise StoreError(f"{d}: {KEYS} holds a {index_kind(index)} (metric {index.metric_type}), the manifest "
                             f"says {kind} (inner product)")
        exact_keys = None
        if EXACT_KEYS in listed:
            exact_keys = np.load(d / EXACT_KEYS, allow_pickle=False, mmap_mode="r")
            if exact_keys.shape != (n, dim) or exact_keys.dtype != np.float32:
                raise StoreError(f"{d}: {EXACT_KEYS} is {exact_keys.shape} {exact_keys.dtype}, the manifest says "
                                 f"[{n}, {dim}] float32")
        if index.ntotal != n or values.shape != (n,) or values.dtype != np.int64 or (len(meta) != n and not legacy):
            raise StoreError(f"{d}: {index.ntotal} keys, values {values.shape} {values.dtype}, {len(meta)} meta "
                             f"rows; the manifest says {n}")
        if index.d != dim:
            raise StoreError(f"{d}: keys have dimension {index.d}, the manifest says {dim}")
        _check_skipped(d, manifest, meta)
        views, bank_views = None, None
        if bank_record:
            rows = np.load(d / VIEW_ROWS, allow_pickle=False)
            bank_views = (_open_bank_views(d, bank_record, n, a, dim, rows, full=full), rows)
        elif a:
            views = np.load(d / VIEWS, allow_pickle=False, mmap_mode="r")
            if views.shape != (a, n, dim) or views.dtype != np.float32:
                raise StoreError(f"{d}: views are {views.shape} {views.dtype}, the manifest says "
                                 f"[{a}, {n}, {dim}] float32")
        store = cls(d, manifest, index, values, views, meta, bank_views)
        store._exact_keys = exact_keys
        return store


# ---------------------------------------------------------------------------------------------- maintenance
def find_stores(root: str | os.PathLike) -> list[Path]:
    """Every store directory under ``root`` (a directory holding a manifest), bank chunks included."""
    root = Path(root)
    found = [p.parent for p in root.rglob(MANIFEST)]
    return sorted(p for p in found if not p.name.startswith("."))


@dataclass
class VerifyReport:
    """What ``verify_tree`` found for one store: ``ok``, ``old`` (an earlier format, unused) or ``bad``."""

    path: Path
    status: str
    detail: str = ""


def verify_tree(root: str | os.PathLike) -> list[VerifyReport]:
    """Fully verify (sha256 of every byte) every store under ``root``."""
    reports = []
    for d in find_stores(root):
        try:
            m = json.loads((d / MANIFEST).read_text())
            version = m.get("format_version") if isinstance(m, dict) else None
        except (OSError, ValueError):
            version = None
        if version in LEGACY_VERSIONS:
            reports.append(VerifyReport(d, "old", f"format {version}, no longer used by this fewclip; "
                                                  "safe to delete"))
            continue
        try:
            KVStore.load(d, full=True)
            reports.append(VerifyReport(d, "ok"))
        except StoreError as e:
            reports.append(VerifyReport(d, "bad", str(e)))
    return reports
