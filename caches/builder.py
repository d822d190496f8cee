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

Encoding writes a bank chunk every ``chunk_images`` encoded images, so a killed build resumes from its finished
chunks. Support stores reference their views' rows in the views bank instead of copying them (each view is
written once); a build reads only the chunks holding rows it takes (``caches/FORMAT.md``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
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
from caches.search import DEFAULT_INDEX, check_factory, is_flat
from caches.store import (
    FORMAT_VERSION,
    MANIFEST,
    META,
    BankRows,
    ChunkRef,
    KVStore,
    StoreError,
    cache_writes,
    check_file,
    fingerprint,
    gather_rows,
    ids_digest,
    read_manifest,
)
from caches.workers import loader_options

log = logging.getLogger(__name__)

# Augmented views are drawn with this seed for every run (see the module docstring): view v of an image is the
# same crop whichever seed drew the image, so it is encoded once.
VIEW_SEED = 0


def remove_leftovers(directory: Path, pattern: str) -> None:
    """Delete the temporary directories of killed writes (the caller holds the lock of everything that writes
    them, so none is in progress)."""
    for tmp in directory.glob(pattern) if directory.is_dir() else []:
        log.info("removing %s, left by an interrupted build", tmp)
        with cache_writes(directory):
            shutil.rmtree(tmp, ignore_errors=True)


_noted_old: set[Path] = set()


def note_old_format(path: Path) -> None:
    """Say so when a store or bank of an earlier format sits where ``path`` (not built yet) will go: its
    settings are the same, but this fewclip does not use it, so its images are encoded again."""
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*") if path.parent.is_dir() else []:
        probe = old / MANIFEST if (old / MANIFEST).is_file() else next(old.glob(f"chunk-*/{MANIFEST}"), None)
        if old == path or probe is None or old in _noted_old:
            continue
        try:
            version = json.loads(probe.read_text()).get("format_version")
        except (OSError, ValueError, AttributeError):
            continue
        if version != FORMAT_VERSION:
            _noted_old.add(old)
            log.warning("%s was written by an older fewclip (store format %s, this one writes %s) and is not "
                        "used: building %s instead. Old stores can be deleted (fewclip cache verify lists them)",
                        old, version, FORMAT_VERSION, path.name)


def index_spec(index: str, dim: int) -> dict[str, str]:
    """The ``index`` field of a store spec: absent for the default ``Flat`` (so that the fingerprints of flat stores
    are those of stores written before indexes were configurable), else the checked factory string."""
    return {} if is_flat(index) else {"index": check_factory(index, dim)}


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
        chunk_images: encoded images (views count) per bank chunk. A build writes a chunk each time this many
            are done, so a killed build resumes from its completed chunks.
    """

    def __init__(self, backbone: FrozenClip, cache_dir: str | os.PathLike, batch_size: int = 64,
                 num_workers: int | None = None, progress: bool | None = None, chunk_images: int = 8192) -> None:
        if chunk_images < 1:
            raise ValueError(f"chunk_images must be >= 1, got {chunk_images}")
        self.backbone = backbone
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        self.chunk_images = chunk_images
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
        if path.exists():  # the common, warm case needs no lock (nor a writable cache): stores are complete once
            try:           # they exist
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
                    with cache_writes(path.parent):
                        shutil.rmtree(path)
            else:
                note_old_format(path)
            remove_leftovers(path.parent, f".{path.name}.tmp-*")
            log.info("building %s", path)
            arrays, extra = build()
            store = KVStore.write(path, spec, extra=extra, **arrays)
        self.built.append(path.name)
        return store

    def _loaded(self, store: KVStore) -> KVStore:
        self.loaded.append(store.path.name)
        log.info("cache hit %s", store.path)
        return store

    def _bank_index(self, bank_dir: Path, bank_spec: dict[str, Any], wanted: set[str]
                    ) -> tuple[list[KVStore], dict[str, tuple[int, int, bool]]]:
        """The bank chunks holding any of the ``wanted`` keys, and where each key is: (chunk, row, readable).

        Only each chunk's manifest and ``meta.csv`` are read to find out; the chunks that hold wanted rows are
        then opened (and verified); the others are not read further. A damaged chunk is removed (the caller
        holds the bank's lock) and its images are encoded again.
        """
        chunks: list[KVStore] = []
        where: dict[str, tuple[int, int, bool]] = {}
        for chunk in sorted(bank_dir.glob("chunk-*")) if bank_dir.is_dir() else []:
            try:
                manifest = read_manifest(chunk)
                if {k: v for k, v in manifest["spec"].items() if k != "chunk"} != bank_spec:
                    raise StoreError(f"{chunk}: written for another bank")
                check_file(chunk, META, manifest["files"][META])
                with open(chunk / META, newline="") as f:
                    meta = list(csv.DictReader(f))
                take = [(i, r) for i, r in enumerate(meta) if r["key"] in wanted and r["key"] not in where]
                if not take:
                    continue
                store = KVStore.load(chunk, manifest["fingerprint"])
            except (StoreError, KeyError, csv.Error, OSError) as e:
                log.warning("removing damaged bank chunk (%s)", e)
                with cache_writes(chunk.parent):
                    shutil.rmtree(chunk, ignore_errors=True)
                continue
            for i, r in take:
                where[r["key"]] = (len(chunks), i, r["readable"] == "1")
            chunks.append(store)
        return chunks, where

    def banked(self, dataset: ImageDataset, samples: Sequence[Sample], bank: str, bank_spec: dict[str, Any],
               to_views: Callable[[Any, Sample], torch.Tensor], n_views: int,
               desc: str) -> tuple[torch.Tensor, torch.Tensor, BankRows]:
        """Features of ``samples`` from the feature bank ``bank``, encoding only the images it lacks.

        Views banks (``bank_spec["kind"] == "views"``) keep ``views.npy`` in every chunk, so a support store can
        point at their rows instead of copying them; eval banks keep the features as the chunks' keys.
        Returns:
            ``[V, N, D]`` float32 normalised features, ``[N]`` bool readable flags (sample order), and where the
            rows are in the bank.
        """
        bank_dir = self.store_path(dataset, f"bank-{bank}", bank_spec)
        keep_views = bank_spec.get("kind") == "views"
        # Keyed by id, size and mtime: an image changed on disk is encoded again, never served stale.
        keys = [sample_stamp(s) for s in samples]
        with file_lock(bank_dir.parent / f".{bank_dir.name}.lock", what=bank_dir.name):
            if not bank_dir.exists():
                note_old_format(bank_dir)
            remove_leftovers(bank_dir, ".chunk-*.tmp-*")
            chunks, where = self._bank_index(bank_dir, bank_spec, set(keys))
            # Chunk features as arrays [V, n, D]: memory-mapped views (read only where rows are taken), or keys.
            arrays: list[np.ndarray] = [
                c.views if keep_views else c.keys().numpy()[None] for c in chunks]
            missing = list({s.id: s for s, k in zip(samples, keys) if k not in where}.values())
            for feats, ok, part in self.encode_chunks(dataset, missing, to_views, n_views, desc):
                ids = [s.id for s in part]
                chunk = KVStore.write(
                    bank_dir / f"chunk-{time.strftime('%Y%m%dT%H%M%S')}-{ids_digest(ids)}",
                    {**bank_spec, "chunk": ids_digest(ids)},
                    keys=(feats[0] if n_views == 1 else F.normalize(feats.mean(dim=0), dim=-1)) * ok[:, None],
                    values=torch.tensor([s.label for s in part], dtype=torch.int64),
                    views=feats if keep_views else None,
                    meta=[{"key": sample_stamp(s), "readable": int(o)} for s, o in zip(part, ok.tolist())])
                for i, (s, o) in enumerate(zip(part, ok.tolist())):
                    where[sample_stamp(s)] = (len(chunks), i, bool(o))
                chunks.append(chunk)
                arrays.append(feats.numpy())
        rows = np.array([where[k][:2] for k in keys], dtype=np.int64).reshape(len(keys), 2)
        feats = gather_rows(arrays, rows, n_views, self.backbone.dim)
        ok = torch.tensor([where[k][2] for k in keys], dtype=torch.bool)
        # Every chunk listed holds at least one of these rows (_bank_index skips the others).
        refs = tuple(ChunkRef.of(c) for c in chunks) if keep_views else ()
        return torch.from_numpy(feats), ok, BankRows(bank_dir, refs, rows)

    def encode_chunks(self, dataset: ImageDataset, samples: Sequence[Sample],
                      to_views: Callable[[Any, Sample], torch.Tensor], n_views: int,
                      desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[Sample]]]:
        """Encode every sample's views, yielding about ``chunk_images`` encoded images at a time.

        Yields:
            ``[V, n, D]`` float32 normalised features (CPU), ``[n]`` bool readable flags, and the n samples.
        """
        if not samples:
            return
        spec = self.backbone.image_spec
        ds = _Pixels(dataset, samples, to_views, n_views, spec.size)
        per_batch = max(1, self.batch_size // n_views)
        workers = self._workers(dataset)
        loader = DataLoader(ds, batch_size=per_batch, shuffle=False, num_workers=workers,
                            pin_memory=self.backbone.device.type == "cuda", **loader_options(workers))
        feats: list[torch.Tensor] = []
        oks: list[torch.Tensor] = []
        done = 0
        t0 = time.perf_counter()
        with Progress(total=len(ds) * n_views, desc=desc, unit="img", enabled=self.progress, leave=False) as bar:
            for pixels, ok in loader:
                b = pixels.shape[0]
                f = self.encode_pixels(pixels.flatten(0, 1))
                feats.append(f.view(b, n_views, -1).transpose(0, 1).cpu())
                oks.append(ok)
                bar.update(b * n_views)
                self.encoded_images += b * n_views
                if sum(o.shape[0] for o in oks) * n_views >= self.chunk_images:
                    n = sum(o.shape[0] for o in oks)
                    self.encode_seconds += time.perf_counter() - t0
                    yield torch.cat(feats, dim=1), torch.cat(oks), list(samples[done:done + n])
                    t0 = time.perf_counter()
                    done += n
                    feats, oks = [], []
        self.encode_seconds += time.perf_counter() - t0
        if feats:
            yield torch.cat(feats, dim=1), torch.cat(oks), list(samples[done:])

    def encode(self, dataset: ImageDataset, samples: Sequence[Sample],
               to_views: Callable[[Any, Sample], torch.Tensor], n_views: int,
               desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode every sample's views.

        Returns:
            ``[V, N, D]`` float32 normalised features (CPU) and ``[N]`` bool readable flags.
        """
        parts = list(self.encode_chunks(dataset, samples, to_views, n_views, desc))
        if not parts:
            return torch.empty(n_views, 0, self.backbone.dim), torch.empty(0, dtype=torch.bool)
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts])

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S] -> [B, D]`` float32 normalised: the encoder call every build goes through."""
        return self.backbone.encode_images(pixels)

    def pixel_split(self, dataset: ImageDataset, samples: Sequence[Sample]) -> PixelSplit:
        """The samples as pixel batches with this backbone's preprocessing (pixel-mode adapters)."""
        return PixelSplit(dataset, samples, self.backbone.image_spec, batch_size=self.batch_size,
                          num_workers=self._workers(dataset), pin_memory=self.backbone.device.type == "cuda")

    # ------------------------------------------------------------------ stores
    def support(self, dataset: ImageDataset, samples: Sequence[Sample], shots: int, seed: int,
                views: int = 10, aug: AugmentSpec | None = None, index: str = DEFAULT_INDEX) -> KVStore:
        """The few-shot cache: A augmented views per image, keys = renormalised view mean.

        Args:
            samples: the sampled support images (K per class).
            index: faiss factory string of the keys' index (``caches.search``); part of the fingerprint unless
                ``Flat``.
        """
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        aug = aug or AugmentSpec()
        ids = [s.id for s in samples]
        spec = {
            "kind": "support", "split": "train", "backbone": self.backbone.describe(),
            "dataset": dataset.describe(), "ids": ids_digest(ids), "data": dataset.sample_digest(samples),
            "shots": shots, "seed": seed, "views": views, "view_seed": VIEW_SEED, "augmentation": aug.as_dict(),
            **index_spec(index, self.backbone.dim),
        }
        path = self.store_path(dataset, f"support-train-k{shots}-s{seed}-v{views}", spec)
        image_spec = self.backbone.image_spec

        def to_views(img: Any, s: Sample) -> torch.Tensor:
            return torch.stack([augmented_view(img, image_spec, aug, view_generator(VIEW_SEED, v, s.id))
                                for v in range(views)])

        bank_spec = {"kind": "views", "backbone": self.backbone.describe(), "dataset": dataset.describe(),
                     "views": views, "view_seed": VIEW_SEED, "augmentation": aug.as_dict()}

        def build() -> tuple[dict[str, Any], dict[str, Any]]:
            feats, ok, rows = self.banked(dataset, samples, f"views-v{views}", bank_spec, to_views, views,
                                          f"support {dataset.name} k={shots}")
            if not bool(ok.all()):
                bad = [s.id for s, o in zip(samples, ok.tolist()) if not o]
                raise StoreError(f"support images became unreadable while encoding: {bad[:5]}")
            # Tip-Adapter's keys: average the views, then renormalise.
            keys = F.normalize(feats.mean(dim=0), dim=-1)
            labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
            meta = [{"id": s.id, "label": s.label, "classname": dataset.classnames[s.label]} for s in samples]
            # The views stay in the bank (written once); the store records where they are.
            return {"keys": keys, "values": labels, "views": feats, "meta": meta, "bank_rows": rows}, {}

        return self._get_or_build(path, spec, build)

    def features(self, dataset: ImageDataset, split: str, samples: Sequence[Sample],
                 index: str = DEFAULT_INDEX) -> KVStore:
        """Eval features of ``samples`` (eval transform, no augmentation). Unreadable images are skipped,
        counted in the manifest (``skipped``) and logged. ``index``: as ``support`` (pools are searched)."""
        ids = [s.id for s in samples]
        spec = {
            "kind": "features", "split": split, "backbone": self.backbone.describe(),
            "dataset": dataset.describe(), "ids": ids_digest(ids), "data": dataset.sample_digest(samples),
            "transform": "resize+center_crop", **index_spec(index, self.backbone.dim),
        }
        path = self.store_path(dataset, f"features-{split}", spec)
        tf = eval_transform(self.backbone.image_spec)

        bank_spec = {"kind": "eval", "backbone": self.backbone.describe(), "dataset": dataset.describe(),
                     "transform": "resize+center_crop"}

        def build() -> tuple[dict[str, Any], dict[str, Any]]:
            feats, ok, _ = self.banked(dataset, samples, "eval", bank_spec, lambda img, s: tf(img)[None], 1,
                                       f"{split} {dataset.name}")
            skipped = [s.id for s, o in zip(samples, ok.tolist()) if not o]
            if skipped:
                log.warning("%s/%s: %d unreadable images skipped", dataset.name, split, len(skipped))
            kept = [s for s, o in zip(samples, ok.tolist()) if o]
            labels = torch.tensor([s.label for s in kept], dtype=torch.int64)
            meta = [{"id": s.id, "label": s.label, "classname": dataset.classnames[s.label]} for s in kept]
            # Where the skipped ids sat among the requested ones: load() checks that they and the stored rows
            # make up exactly the ids of the spec.
            skipped_at = [i for i, o in enumerate(ok.tolist()) if not o]
            return ({"keys": feats[0][ok], "values": labels, "meta": meta},
                    {"skipped": skipped, "skipped_at": skipped_at})

        return self._get_or_build(path, spec, build)

    def derived(self, dataset: ImageDataset, stem: str, spec: dict[str, Any],
                build: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> KVStore:
        """A store computed from other stores (e.g. a support set grown from a pool): loaded when its directory
        holds a valid one for ``spec``, else ``build()`` -> (``KVStore.write`` arguments, extra manifest fields)."""
        return self._get_or_build(self.store_path(dataset, stem, spec), spec, build)

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

