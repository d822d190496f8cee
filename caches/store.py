"""On-disk key-value stores of CLIP features (the format is described in ``caches/FORMAT.md``).

A store is a directory: ``manifest.json`` + ``keys.faiss`` (inner-product index over float32 L2-normalised
keys) + ``values.npy`` (int64 labels) + optional ``views.npy`` (per-view features) + ``meta.csv``.
Its name ends in the fingerprint of everything that produced it; ``load`` checks that fingerprint and the
checksum of every file, and ``write`` builds in a temporary directory renamed into place, so an
interrupted build never looks like a valid store.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KEYS = "keys.faiss"
VALUES = "values.npy"
VIEWS = "views.npy"
META = "meta.csv"


class StoreError(RuntimeError):
    """A store is missing, incomplete, corrupt or was produced by different settings."""


def fingerprint(spec: dict[str, Any]) -> str:
    """Short content address of a store: sha256 of the canonical JSON of its spec."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available() and faiss.get_num_gpus() > 0


def _versions() -> dict[str, str]:
    import faiss

    return {"torch": torch.__version__, "faiss": getattr(faiss, "__version__", "?"), "numpy": np.__version__}


class KVStore:
    """A loaded store: a faiss index over keys, int64 values, optional per-view features and row metadata.

    Use ``KVStore.write`` to create one and ``KVStore.load`` to open one.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], index: Any, values: np.ndarray,
                 views: np.ndarray | None, meta: list[dict[str, str]]) -> None:
        self.path = path
        self.manifest = manifest
        self.index = index
        self.values = values
        self.views = views
        self.meta = meta
        self._gpu_index = None

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def keys(self) -> torch.Tensor:
        """``[N, D]`` float32 keys (reconstructed from the flat index, which stores them exactly)."""
        n = self.index.ntotal
        if n == 0:
            return torch.empty(0, self.index.d)
        return torch.from_numpy(self.index.reconstruct_n(0, n).copy())

    def labels(self) -> torch.Tensor:
        """``[N]`` int64 values."""
        return torch.from_numpy(self.values.copy())

    def view_features(self) -> torch.Tensor | None:
        """``[A, N, D]`` float32 per-view features, or None when the store has none."""
        return None if self.views is None else torch.from_numpy(np.array(self.views))

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest keys by inner product: ``[B, D] -> ([B, k] scores, [B, k] row ids)``.

        Runs on a faiss GPU index when faiss has GPU support and CUDA is present.
        """
        index = self.index
        if faiss_has_gpu():
            import faiss

            if self._gpu_index is None:
                self._gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self.index)
            index = self._gpu_index
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        scores, ids = index.search(q, k)
        return torch.from_numpy(scores), torch.from_numpy(ids)

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
    ) -> KVStore:
        """Write a store atomically and return it loaded.

        Args:
            path: final directory; must not hold a valid store already (it is replaced otherwise).
            spec: everything that produced the store; its fingerprint is recorded and checked on load.
            keys: ``[N, D]`` float32, rows L2-normalised.
            values: ``[N]`` integer labels.
            views: optional ``[A, N, D]`` float32 per-view features.
            meta: optional rows (dicts with the same keys) for ``meta.csv``.
            extra: more manifest fields that are not part of the fingerprint (counts, timings).
        """
        import faiss

        final = Path(path)
        keys_np = np.ascontiguousarray(keys.detach().float().cpu().numpy())
        values_np = np.ascontiguousarray(values.detach().cpu().numpy().astype(np.int64))
        if keys_np.ndim != 2 or values_np.shape != (keys_np.shape[0],):
            raise ValueError(f"keys must be [N, D] and values [N]; got {keys_np.shape} and {values_np.shape}")
        if views is not None and (views.ndim != 3 or tuple(views.shape[1:]) != keys_np.shape):
            raise ValueError(f"views must be [A, N, D] = [A, {keys_np.shape}]; got {tuple(views.shape)}")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            index = faiss.IndexFlatIP(keys_np.shape[1])
            if len(keys_np):
                index.add(keys_np)
            faiss.write_index(index, str(tmp / KEYS))
            np.save(tmp / VALUES, values_np, allow_pickle=False)
            if views is not None:
                np.save(tmp / VIEWS, np.ascontiguousarray(views.detach().float().cpu().numpy()),
                        allow_pickle=False)
            rows = list(meta or [])
            with open(tmp / META, "w", newline="") as f:
                fields = ["row", *([k for k in rows[0] if k != "row"] if rows else [])]
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                for i, r in enumerate(rows):
                    w.writerow({"row": i, **{k: v for k, v in r.items() if k != "row"}})
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint(spec),
                "spec": spec,
                "n": int(keys_np.shape[0]),
                "dim": int(keys_np.shape[1]),
                "views": int(views.shape[0]) if views is not None else 0,
                "index": "IndexFlatIP",
                "files": {name: _sha256(tmp / name) for name in files},
                "versions": _versions(),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **(extra or {}),
            }
            # The manifest is written last: a directory without one is never a store.
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            if final.exists():
                # Another process finished the same store first, or a stale one sits here: keep a valid
                # identical one, replace anything else.
                try:
                    return cls.load(final, manifest["fingerprint"])
                except StoreError:
                    shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.load(final, manifest["fingerprint"])

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str | None = None,
             verify: bool = True) -> KVStore:
        """Open a store, checking its format version, fingerprint and file checksums.

        Raises:
            StoreError: when anything does not match; a store is never reused on a mismatch.
        """
        import faiss

        d = Path(path)
        mpath = d / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{d}: no {MANIFEST} (missing or interrupted build)")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{d}: unreadable manifest ({e})") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{d}: format version {manifest.get('format_version')} != {FORMAT_VERSION}")
        fp = fingerprint(manifest.get("spec", {}))
        if manifest.get("fingerprint") != fp:
            raise StoreError(f"{d}: manifest fingerprint does not match its spec (edited or corrupt)")
        if expected_fingerprint is not None and fp != expected_fingerprint:
            raise StoreError(f"{d}: fingerprint {fp} != expected {expected_fingerprint}: built from other settings")
        for name, digest in manifest.get("files", {}).items():
            f = d / name
            if not f.is_file():
                raise StoreError(f"{d}: missing file {name}")
            if verify and _sha256(f) != digest:
                raise StoreError(f"{d}: checksum mismatch for {name} (corrupt or modified)")
        index = faiss.read_index(str(d / KEYS))
        values = np.load(d / VALUES, allow_pickle=False)
        views = np.load(d / VIEWS, allow_pickle=False, mmap_mode="r") if (d / VIEWS).is_file() else None
        with open(d / META, newline="") as f:
            meta = list(csv.DictReader(f))
        if index.ntotal != len(values) or index.ntotal != manifest["n"]:
            raise StoreError(f"{d}: {index.ntotal} keys, {len(values)} values, manifest says {manifest['n']}")
        return cls(d, manifest, index, values, views, meta)
