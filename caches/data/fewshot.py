"""Few-shot sampling: K images per class from train, min(K, 4) per class from val (CoOp's protocol).

The draw uses a local generator seeded by ``seed`` (never the global RNG), skips unreadable images
deterministically, and is persisted as JSON so that the ids behind every cache can be inspected.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from caches.data.records import DatasetError, ImageDataset, Sample
from caches.store import cache_writes

log = logging.getLogger(__name__)


@dataclass
class FewShotSplit:
    """The sampled ids: ``train`` (K per class) and ``val`` (min(K, 4) per class), in class order."""

    dataset: str
    shots: int
    seed: int
    train: list[str]
    val: list[str]
    skipped_unreadable: list[str]
    data_digest: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def val_shots(shots: int) -> int:
    """CoOp's validation size: min(K, 4) images per class."""
    return min(shots, 4)


def _draw(
    dataset: ImageDataset,
    samples: list[Sample],
    per_class: int,
    rng: np.random.Generator,
    what: str,
    allow_fewer: bool,
    check_readable: bool,
    skipped: list[str],
) -> list[Sample]:
    by_class: dict[int, list[Sample]] = {c: [] for c in range(dataset.n_classes)}
    for s in samples:
        by_class[s.label].append(s)
    chosen: list[Sample] = []
    for c, pool in by_class.items():
        # Walk a seeded permutation of the class and take the first `per_class` readable images, so a corrupt
        # file is replaced by the next draw instead of silently shrinking the class.
        order = rng.permutation(len(pool))
        got: list[Sample] = []
        for i in order:
            if len(got) == per_class:
                break
            s = pool[int(i)]
            if check_readable and not dataset.is_readable(s):
                skipped.append(s.id)
                continue
            got.append(s)
        if len(got) < per_class:
            msg = (f"{what}: class {c} ('{dataset.classnames[c]}') has {len(got)} usable images, "
                   f"{per_class} requested")
            if not allow_fewer:
                raise DatasetError(msg + ". Lower shots=, or pass fewshot.allow_fewer=true to take all of them.")
            log.warning("%s; taking all %d", msg, len(got))
        chosen += sorted(got, key=lambda s: s.id)
    return chosen


def sample_fewshot(
    dataset: ImageDataset,
    shots: int,
    seed: int,
    allow_fewer: bool = False,
    check_readable: bool = True,
) -> FewShotSplit:
    """Draw K shots per class from train and min(K, 4) per class from val.

    ``allow_fewer``: a class with fewer than K usable training images is an error by default (the protocol
    would silently change); with True all its images are taken and a warning is logged. Val always takes
    what there is, with a warning, since it only ranks hyperparameters.
    """
    if shots < 1:
        raise DatasetError(f"shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    skipped: list[str] = []
    train = _draw(dataset, dataset.splits["train"], shots, rng, "train", allow_fewer, check_readable, skipped)
    val = _draw(dataset, dataset.splits["val"], val_shots(shots), rng, "val", True, check_readable, skipped)
    if not val:
        raise DatasetError(f"dataset {dataset.name}: the val split is empty; hyperparameters need val data")
    digest = dataset.sample_digest(dataset.splits["train"] + dataset.splits["val"])
    return FewShotSplit(dataset.name, shots, seed, [s.id for s in train], [s.id for s in val], skipped, digest)


def persist_fewshot(split: FewShotSplit, directory: str | os.PathLike) -> Path:
    """Write the ids as JSON (atomically) and return the path.

    A file with the same content is left alone, so a run whose caches are all warm writes nothing (and works in
    a read-only cache directory).
    Raises:
        CacheWriteError: the file is missing or differs and the directory cannot be written.
    """
    d = Path(directory)
    path = d / f"fewshot-k{split.shots}-s{split.seed}-{split.data_digest}.json"
    text = split.to_json()
    try:
        if path.read_text() == text:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    with cache_writes(d):
        d.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def select(dataset: ImageDataset, split: str, ids: list[str]) -> list[Sample]:
    """The samples of ``split`` with the given ids, in the order of ``ids``."""
    index = {s.id: s for s in dataset.splits[split]}
    missing = [i for i in ids if i not in index]
    if missing:
        raise DatasetError(f"{len(missing)} ids not found in split {split}: {missing[:3]}")
    return [index[i] for i in ids]
