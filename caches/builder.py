"""Encode few-shot support sets, eval splits and text heads into fingerprinted stores, once.

``CacheBuilder`` is idempotent: each store lives at
``<cache_dir>/<backbone>/<dataset>/<kind>-<split>[-k<K>-s<seed>-v<A>]-<fingerprint>/`` and is loaded (and
verified) when present, built otherwise. A second run with the same settings encodes nothing.

Every image is encoded once per backbone and transform, whatever the shots, seeds and adapters: the encoder
writes into feature *banks* (``bank-eval-*`` for the eval transform, ``bank-views-*`` for a set of A augmented
views), append-only directories of chunk stores keyed by image id, and the per-run stores are assembled from
them. The views of an image depend on (image, view index, augmentation), not on the run seed, so a support image
drawn by two seeds is encoded once. Concurrent jobs serialise on file locks (``caches.locks``): a job waits for
a store or bank chunk that another job is building instead of building it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from caches.backbone import FrozenClip
from caches.data.augment import AugmentSpec, augmented_view, eval_transform, view_generator
from caches.data.pixels import PixelSplit
from caches.data.records import ImageDataset, Sample, sample_stamp
from caches.locks import file_lock
from caches.progress import Progress
from caches.store import KVStore, StoreError, fingerprint

log = logging.getLogger(__name__)

# Augmented views are drawn with this seed for every run (see the module docstring): view v of an image is the
# same crop whichever seed drew the image, so it is encoded once.
VIEW_SEED = 0


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


class _Pixels(Dataset):
    """Lazily opened images -> ``[V, 3, S, S]`` tensors (V views per image) and a readable flag."""

    def __init__(self, dataset: ImageDataset, samples: Sequence[Sample],
                 to_views: Callable[[Any, Sample], torch.Tensor], n_views: int, size: int) -> None:
        self.dataset, self.samples, self.to_views = dataset, list(samples), to_views
        self.n_views, self.size = n_views, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        s = self.samples[i]
        try:
            img = self.dataset.load_image(s)
        except Exception as e:  # corrupt or unreadable: report, never crash the whole build
            log.warning("unreadable image %s (%s): skipped", s.id, e)
            return torch.zeros(self.n_views, 3, self.size, self.size), False
        # Decode once, then cut every view from the same decoded image.
        return self.to_views(img, s), True


class CacheBuilder:
    """Builds or loads the stores of one backbone under ``cache_dir``.

    Args:
        backbone: the frozen encoder.
        cache_dir: root of all stores.
        batch_size: images per encoder forward (views count as images).
        num_workers: DataLoader workers; ``None`` picks 0 for in-memory datasets and up to 4 otherwise.
        progress: progress bars (None: on a terminal only; otherwise a log line per stage).
    """

    def __init__(self, backbone: FrozenClip, cache_dir: str | os.PathLike, batch_size: int = 64,
                 num_workers: int | None = None, progress: bool | None = None) -> None:
        self.backbone = backbone
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        self.encoded_images = 0  # images run through the image encoder by this builder (views count)
        self.encode_seconds = 0.0
        self.built: list[str] = []
        self.loaded: list[str] = []

    # ------------------------------------------------------------------ plumbing
    def _workers(self, dataset: ImageDataset) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return 0 if dataset.in_memory else min(4, os.cpu_count() or 1)

    def store_path(self, dataset: ImageDataset, stem: str, spec: dict[str, Any]) -> Path:
        return self.cache_dir / self.backbone.name / dataset.name / f"{stem}-{fingerprint(spec)}"

    def _get_or_build(self, path: Path, spec: dict[str, Any],
                      build: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> KVStore:
        fp = fingerprint(spec)
        if path.exists():  # the common, warm case needs no lock: stores are complete once they exist
            try:
                return self._loaded(KVStore.load(path, fp))
            except StoreError:
                pass
        with file_lock(path.parent / f".{path.name}.lock", what=path.name):
            if path.exists():  # built by another job while this one waited, or invalid
                try:
                    return self._loaded(KVStore.load(path, fp))
                except StoreError as e:
                    # Never reuse a store that fails verification: rebuild it from scratch.
                    log.warning("discarding invalid store (%s); rebuilding", e)
                    shutil.rmtree(path)
            log.info("building %s", path)
            arrays, extra = build()
            store = KVStore.write(path, spec, extra=extra, **arrays)
        self.built.append(path.name)
        return store

    def _loaded(self, store: KVStore) -> KVStore:
        self.loaded.append(store.path.name)
        log.info("cache hit %s", store.path)
        return store

    def banked(self, dataset: ImageDataset, samples: Sequence[Sample], bank: str, bank_spec: dict[str, Any],
               to_views: Callable[[Any, Sample], torch.Tensor], n_views: int,
               desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of ``samples`` from the feature bank ``bank``, encoding only the images it lacks.

        Returns:
            ``[V, N, D]`` float32 normalised features and ``[N]`` bool readable flags, in sample order.
        """
        bank_dir = self.store_path(dataset, f"bank-{bank}", bank_spec)
        with file_lock(bank_dir.parent / f".{bank_dir.name}.lock", what=bank_dir.name):
            rows: dict[str, tuple[torch.Tensor, bool]] = {}
            # Keyed by id, size and mtime: an image changed on disk is encoded again, never served stale.
            keys = {s.id: sample_stamp(s) for s in samples}
            wanted = set(keys.values())
            for chunk in sorted(bank_dir.glob("chunk-*")) if bank_dir.is_dir() else []:
                try:
                    store = KVStore.load(chunk)
                except StoreError as e:  # a damaged chunk: removed (under the lock), its images encoded again
                    log.warning("removing damaged bank chunk (%s)", e)
                    shutil.rmtree(chunk, ignore_errors=True)
                    continue
                # Copy only the rows this store needs: a views bank can grow to gigabytes (views.npy is mmapped).
                take = [i for i, r in enumerate(store.meta) if r["key"] in wanted]
                if not take:
                    continue
                feats = torch.from_numpy(np.ascontiguousarray(store.views[:, take])) if n_views > 1 \
                    else store.keys()[take][None]
                for j, i in enumerate(take):
                    r = store.meta[i]
                    rows[r["key"]] = (feats[:, j], r["readable"] == "1")
            missing = list({s.id: s for s in samples if keys[s.id] not in rows}.values())
            if missing:
                feats, ok = self.encode(dataset, missing, to_views, n_views, desc)
                ids = [s.id for s in missing]
                store = KVStore.write(
                    bank_dir / f"chunk-{time.strftime('%Y%m%dT%H%M%S')}-{ids_digest(ids)}",
                    {**bank_spec, "chunk": ids_digest(ids)},
                    keys=(feats[0] if n_views == 1 else F.normalize(feats.mean(dim=0), dim=-1)) * ok[:, None],
                    values=torch.tensor([s.label for s in missing], dtype=torch.int64),
                    views=feats if n_views > 1 else None,
                    meta=[{"key": keys[s.id], "readable": int(o)} for s, o in zip(missing, ok.tolist())])
                for i, s in enumerate(missing):
                    rows[keys[s.id]] = (feats[:, i], bool(ok[i]))
        if not samples:
            return torch.empty(n_views, 0, self.backbone.dim), torch.empty(0, dtype=torch.bool)
        return (torch.stack([rows[keys[s.id]][0] for s in samples], dim=1).float(),
                torch.tensor([rows[keys[s.id]][1] for s in samples], dtype=torch.bool))

    def encode(self, dataset: ImageDataset, samples: Sequence[Sample],
               to_views: Callable[[Any, Sample], torch.Tensor], n_views: int,
               desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode every sample's views.

        Returns:
            ``[V, N, D]`` float32 normalised features (CPU) and ``[N]`` bool readable flags.
        """
        spec = self.backbone.image_spec
        ds = _Pixels(dataset, samples, to_views, n_views, spec.size)
        per_batch = max(1, self.batch_size // n_views)
        loader = DataLoader(ds, batch_size=per_batch, shuffle=False, num_workers=self._workers(dataset),
                            pin_memory=self.backbone.device.type == "cuda")
        feats, oks = [], []
        t0 = time.perf_counter()
        with Progress(total=len(ds) * n_views, desc=desc, unit="img", enabled=self.progress, leave=False) as bar:
            for pixels, ok in loader:
                b = pixels.shape[0]
                f = self.encode_pixels(pixels.flatten(0, 1))
                feats.append(f.view(b, n_views, -1).transpose(0, 1).cpu())
                oks.append(ok)
                bar.update(b * n_views)
        self.encode_seconds += time.perf_counter() - t0
        self.encoded_images += len(ds) * n_views
        if not feats:
            return torch.empty(n_views, 0, self.backbone.dim), torch.empty(0, dtype=torch.bool)
        return torch.cat(feats, dim=1), torch.cat(oks)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S] -> [B, D]`` float32 normalised: the encoder call every build goes through."""
        return self.backbone.encode_images(pixels)

    def pixel_split(self, dataset: ImageDataset, samples: Sequence[Sample]) -> PixelSplit:
        """The samples as pixel batches with this backbone's preprocessing (pixel-mode adapters)."""
        return PixelSplit(dataset, samples, self.backbone.image_spec, batch_size=self.batch_size,
                          num_workers=self._workers(dataset), pin_memory=self.backbone.device.type == "cuda")

    # ------------------------------------------------------------------ stores
    def support(self, dataset: ImageDataset, samples: Sequence[Sample], shots: int, seed: int,
                views: int = 10, aug: AugmentSpec | None = None) -> KVStore:
        """The few-shot cache: A augmented views per image, keys = renormalised view mean.

        Args:
            samples: the sampled support images (K per class).
        """
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        aug = aug or AugmentSpec()
        ids = [s.id for s in samples]
        spec = {
            "kind": "support", "split": "train", "backbone": self.backbone.describe(),
            "dataset": dataset.describe(), "ids": ids_digest(ids), "data": dataset.sample_digest(samples),
            "shots": shots, "seed": seed, "views": views, "view_seed": VIEW_SEED, "augmentation": aug.as_dict(),
        }
        path = self.store_path(dataset, f"support-train-k{shots}-s{seed}-v{views}", spec)
        image_spec = self.backbone.image_spec

        def to_views(img: Any, s: Sample) -> torch.Tensor:
            return torch.stack([augmented_view(img, image_spec, aug, view_generator(VIEW_SEED, v, s.id))
                                for v in range(views)])

        bank_spec = {"kind": "views", "backbone": self.backbone.describe(), "dataset": dataset.describe(),
                     "views": views, "view_seed": VIEW_SEED, "augmentation": aug.as_dict()}

        def build() -> tuple[dict[str, Any], dict[str, Any]]:
            feats, ok = self.banked(dataset, samples, f"views-v{views}", bank_spec, to_views, views,
                                    f"support {dataset.name} k={shots}")
            if not bool(ok.all()):
                bad = [s.id for s, o in zip(samples, ok.tolist()) if not o]
                raise StoreError(f"support images became unreadable while encoding: {bad[:5]}")
            # Tip-Adapter's keys: average the views, then renormalise.
            keys = F.normalize(feats.mean(dim=0), dim=-1)
            labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
            meta = [{"id": s.id, "label": s.label, "classname": dataset.classnames[s.label]} for s in samples]
            return {"keys": keys, "values": labels, "views": feats, "meta": meta}, {}

        return self._get_or_build(path, spec, build)

    def features(self, dataset: ImageDataset, split: str, samples: Sequence[Sample]) -> KVStore:
        """Eval features of ``samples`` (eval transform, no augmentation). Unreadable images are skipped,
        counted in the manifest (``skipped``) and logged."""
        ids = [s.id for s in samples]
        spec = {
            "kind": "features", "split": split, "backbone": self.backbone.describe(),
            "dataset": dataset.describe(), "ids": ids_digest(ids), "data": dataset.sample_digest(samples),
            "transform": "resize+center_crop",
        }
        path = self.store_path(dataset, f"features-{split}", spec)
        tf = eval_transform(self.backbone.image_spec)

        bank_spec = {"kind": "eval", "backbone": self.backbone.describe(), "dataset": dataset.describe(),
                     "transform": "resize+center_crop"}

        def build() -> tuple[dict[str, Any], dict[str, Any]]:
            feats, ok = self.banked(dataset, samples, "eval", bank_spec, lambda img, s: tf(img)[None], 1,
                                    f"{split} {dataset.name}")
            skipped = [s.id for s, o in zip(samples, ok.tolist()) if not o]
            if skipped:
                log.warning("%s/%s: %d unreadable images skipped", dataset.name, split, len(skipped))
            kept = [s for s, o in zip(samples, ok.tolist()) if o]
            labels = torch.tensor([s.label for s in kept], dtype=torch.int64)
            meta = [{"id": s.id, "label": s.label, "classname": dataset.classnames[s.label]} for s in kept]
            return {"keys": feats[0][ok], "values": labels, "meta": meta}, {"skipped": skipped}

        return self._get_or_build(path, spec, build)

    def text(self, dataset: ImageDataset) -> KVStore:
        """The zero-shot text head ``[C, D]`` (template ensemble), values = class index.

        ``meta.csv`` also keeps each class's raw text norm (``raw_norm``, see ``text_raw_norms``).
        """
        spec = {
            "kind": "text", "backbone": self.backbone.describe(),
            "classnames": dataset.classnames, "templates": dataset.templates, "meta": ["classname", "raw_norm"],
        }
        path = self.store_path(dataset, "text", spec)

        def build() -> tuple[dict[str, Any], dict[str, Any]]:
            head, norms = self.backbone.text_head_and_norms(dataset.classnames, dataset.templates)
            head = head.cpu()
            meta = [{"classname": c, "raw_norm": repr(float(n))} for c, n in zip(dataset.classnames, norms.tolist())]
            return {"keys": head, "values": torch.arange(len(dataset.classnames)), "meta": meta}, {}

        return self._get_or_build(path, spec, build)


def text_raw_norms(store: KVStore) -> torch.Tensor | None:
    """``[C]`` raw text norms kept by a text store (``AdapterContext.text_norms``); None for stores without them."""
    if not store.meta or "raw_norm" not in store.meta[0]:
        return None
    return torch.tensor([float(row["raw_norm"]) for row in store.meta], dtype=torch.float32)


def describe_stores(stores: dict[str, KVStore]) -> dict[str, dict[str, Any]]:
    """Fingerprints and paths of the stores a run used (for ``result.json``)."""
    return {k: {"fingerprint": s.fingerprint, "path": str(s.path), "n": len(s)} for k, s in stores.items()}

