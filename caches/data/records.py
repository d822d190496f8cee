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
        check_overlaps(self.name, self.splits)

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def load_image(self, sample: Sample) -> Image.Image:
        """Open one image as 8-bit RGB (``to_rgb``). Raises ``OSError``, a PIL error or ``UnsupportedImageError``
        when it is unreadable."""
        with Image.open(sample.path) as img:
            img.load()
            return to_rgb(img)

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


def check_overlaps(name: str, splits: dict[str, list[Sample]]) -> None:
    """Refuse an image listed in two splits or under two labels (it would be scored on what it was trained on, or
    under a wrong label); warn about an image listed twice with the same label in one split.

    Raises:
        DatasetError: naming up to three such images and where each appears.
    """
    every = [(s.id, split, s.label) for split in SPLITS for s in splits.get(split, [])]
    ids = [i for i, _, _ in every]
    if len(set(ids)) == len(ids):  # the common case costs one set
        return
    seen: dict[str, set[tuple[str, int]]] = {}
    for i, split, label in every:
        seen.setdefault(i, set()).add((split, label))
    conflicts = {i: sorted(v) for i, v in seen.items() if len(v) > 1}
    if conflicts:
        shown = "; ".join(f"{i} in " + ", ".join(f"{sp} (label {lb})" for sp, lb in v)
                          for i, v in list(conflicts.items())[:3])
        raise DatasetError(f"dataset {name}: {len(conflicts)} images are listed in two splits or under two labels, "
                           f"e.g. {shown}")
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    repeated = [i for i, n in counts.items() if n > 1]
    log.warning("dataset %s: %d images are listed twice with the same label and split, e.g. %s", name,
                len(repeated), repeated[:3])


def check_trainable(dataset: ImageDataset) -> None:
    """What fitting a classifier needs of a dataset, checked before any backbone is loaded: a train split and at
    least two classes (one class scores 100% whatever the method).

    Raises:
        DatasetError: saying what is missing.
    """
    if not dataset.splits["train"]:
        raise DatasetError(f"dataset {dataset.name} is evaluation-only (no train split): fit on its parent and "
                           f"pass targets=[{dataset.name}]")
    if dataset.n_classes < 2:
        raise DatasetError(f"dataset {dataset.name} has {dataset.n_classes} class {dataset.classnames}: a "
                           "classifier needs at least 2 (a one-class dataset scores 100% whatever it predicts)")


class UnsupportedImageError(ValueError):
    """An image whose pixel format cannot be turned into 8-bit RGB without guessing."""


_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _bit_depth(img: Image.Image) -> int | None:
    """Bits per sample of a single-channel integer image: 16 for ``I;16*`` modes and PNG (whose deepest grey is 16
    bits), the TIFF ``BitsPerSample`` tag otherwise; None when the file does not say."""
    if img.mode.startswith("I;16") or img.format == "PNG":
        return 16
    tags = getattr(img, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None  # TIFF BitsPerSample
    if isinstance(bits, tuple):
        bits = bits[0]
    return int(bits) if bits else None


def to_rgb(img: Image.Image) -> Image.Image:
    """An image as 8-bit RGB, scaling high-bit-depth grey by its bit depth.

    PIL's ``convert("RGB")`` clips 16-bit (``I;16``) and 32-bit (``I``) grey at 255, which turns most of a 16-bit
    image white, and float (``F``) images are clipped the same way. Here a ``B``-bit integer image is scaled by
    ``255 / (2**B - 1)`` (rounded), and a float image with values in [0, 1] by 255.

    Raises:
        UnsupportedImageError: an integer image of unknown bit depth or with negative values, or a float image
            outside [0, 1], rather than guessing a scale.
    """
    if img.mode not in _HIGH_BIT_MODES:
        return img.convert("RGB")
    a = np.asarray(img)
    if img.mode == "F":
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise UnsupportedImageError(
                f"float (mode F) image with values in [{a.min():.3g}, {a.max():.3g}]: only [0, 1] can be converted "
                "to 8-bit without guessing; save it as 8- or 16-bit")
        grey = np.rint(a.astype(np.float64) * 255.0)
    else:
        bits = _bit_depth(img)
        if bits is None or not 1 <= bits <= 32:
            raise UnsupportedImageError(f"{img.mode} image of unknown bit depth: save it as 8- or 16-bit")
        if a.size and a.min() < 0:
            raise UnsupportedImageError(f"signed {bits}-bit image (values down to {a.min()}): save it as 8- or 16-bit")
        grey = np.rint(a.astype(np.float64) * (255.0 / (2.0**bits - 1)))
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")


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
