"""Records shared by every dataset: samples, splits and the dataset object the cache builder consumes."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DatasetError(ValueError):
    """A dataset is missing, empty or laid out wrongly. The message says what was expected."""


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    ``id`` is stable across machines (a path relative to the dataset root, or ``digits/123``); ``path`` is
    where to read the file (None for in-memory datasets).
    """

    id: str
    label: int
    path: str | None = None


@dataclass
class ImageDataset:
    """A labelled image dataset split into train/val/test, with its class names and prompt templates.

    Subclasses that keep images in memory override ``load_image``.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    splits: dict[str, list[Sample]]
    source: dict[str, Any] = field(default_factory=dict)
    in_memory: bool = False
    # For evaluation-only targets whose classes are a subset of another dataset's (ImageNet-A/R: 200 of
    # ImageNet's 1000): the parent label of each class, so a classifier fitted on the parent can be scored.
    parent_labels: list[int] | None = None

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise DatasetError(f"dataset {self.name}: missing splits {missing}")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise DatasetError(f"dataset {self.name}: every template must contain '{{}}': {self.templates}")
        n_cls = len(self.classnames)
        for split, samples in self.splits.items():
            bad = [s.id for s in samples if not 0 <= s.label < n_cls]
            if bad:
                raise DatasetError(f"dataset {self.name}: {len(bad)} {split} labels outside [0, {n_cls}): {bad[:3]}")

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def load_image(self, sample: Sample) -> Image.Image:
        """Open one image as RGB. Raises ``OSError`` (or a PIL error) when it is unreadable."""
        with Image.open(sample.path) as img:
            img.load()
            return img.convert("RGB")

    def is_readable(self, sample: Sample) -> bool:
        try:
            self.load_image(sample)
            return True
        except Exception as e:  # PIL raises several types for corrupt files
            log.warning("unreadable image %s (%s): skipped", sample.id, e)
            return False

    def sample_digest(self, samples: Sequence[Sample]) -> str:
        """Hash of ids, labels and (for files) sizes and modification times: changes when the data does."""
        h = hashlib.sha256()
        for s in samples:
            h.update(f"{sample_stamp(s)}\t{s.label}\n".encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What identifies this dataset in cache fingerprints and results."""
        return {
            "name": self.name,
            "classnames_sha": hashlib.sha256(json.dumps(self.classnames).encode()).hexdigest()[:16],
            "n_classes": self.n_classes,
            "source": self.source,
        }


def sample_stamp(s: Sample) -> str:
    """The sample's id plus, for files, size and modification time: changes when the image does."""
    if s.path is None:
        return s.id
    try:
        st = os.stat(s.path)
        return f"{s.id}\t{st.st_size}\t{st.st_mtime_ns}"
    except OSError:
        return f"{s.id}\tmissing"


def classname_from_folder(folder: str) -> str:
    """Folder names become class names with ``_`` turned into spaces (CoOp's convention)."""
    return folder.replace("_", " ").strip()


def stratified_split(
    labels: Sequence[int], fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Split indices into len(fractions) parts, class by class, with a local seeded generator.

    Each class is shuffled and cut by the fractions (rounded, each part getting at least one item when the
    class has enough), so every part keeps the class balance of the whole.

    Returns:
        one sorted list of indices per fraction.
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.ndim != 1 or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise DatasetError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        counts = np.floor(fr * len(idx)).astype(int)
        # Hand out the remainder to the largest fractional parts, then make sure every non-empty fraction
        # gets at least one item when the class is big enough (val and test must cover every class).
        rem = len(idx) - counts.sum()
        order = np.argsort(-(fr * len(idx) - counts), kind="stable")
        counts[order[:rem]] += 1
        for j in np.flatnonzero((counts == 0) & (fr > 0)):
            donor = int(np.argmax(counts))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[j] += 1
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for j in range(len(fractions)):
            parts[j].extend(idx[bounds[j] : bounds[j + 1]].tolist())
    return [sorted(p) for p in parts]


SUBSAMPLE_MODES = ("all", "base", "new")


def base_class_count(n_classes: int) -> int:
    """CoOp's base-to-novel rule: the first ceil(C / 2) labels are base, the rest novel."""
    return math.ceil(n_classes / 2)


def subsample_classes(dataset: ImageDataset, mode: str) -> ImageDataset:
    """Keep the base (first ceil(C/2) labels) or new (the rest) classes, relabelled from 0; ``all`` keeps all.

    Every split is filtered the same way, so base-to-novel runs fit and evaluate on one half each.
    """
    if mode not in SUBSAMPLE_MODES:
        raise DatasetError(f"dataset.subsample must be one of {SUBSAMPLE_MODES}, got '{mode}'")
    if mode == "all":
        return dataset
    n_base = base_class_count(dataset.n_classes)
    keep = range(n_base) if mode == "base" else range(n_base, dataset.n_classes)
    new_label = {old: new for new, old in enumerate(keep)}
    dataset.splits = {
        split: [Sample(s.id, new_label[s.label], s.path) for s in samples if s.label in new_label]
        for split, samples in dataset.splits.items()
    }
    dataset.classnames = [dataset.classnames[c] for c in keep]
    if dataset.parent_labels is not None:
        dataset.parent_labels = [dataset.parent_labels[c] for c in keep]
    dataset.source = {**dataset.source, "subsample": mode}
    return dataset
