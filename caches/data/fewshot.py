"""Few-shot sampling: K images per class from train, min(K, 4) per class from val (CoOp's protocol).

Two samplers, both seeded locally (never the global RNG), both persisted as JSON so that the ids behind every
cache can be inspected:

- ``fewclip`` (default): a numpy generator seeded by ``seed`` walks a permutation of each class and skips
  unreadable images (the next image of the permutation replaces them).
- ``dassl``: exactly the images Dassl's ``DatasetBase.generate_fewshot_dataset`` draws for the same seed and
  split list (KaiyangZhou/Dassl.pytorch ``dassl/data/datasets/base_dataset.py``), as CoOp and every method built
  on its data code (CoCoOp, KgCoOp, TaskRes, CLAP, MaPLe) do before pickling them to
  ``split_fewshot/shot_K-seed_S.pkl`` (KaiyangZhou/CoOp ``datasets/*.py``). Re-derived from that source:

  1. ``train.py`` calls ``set_random_seed(seed)`` (``random.seed``) and nothing draws from ``random`` before the
     dataset is built;
  2. the split list (``train``, then ``val``, in the order of the split file) is grouped by label, the groups
     kept in the order each label first appears;
  3. per group, ``random.sample(items, K)`` when it holds at least K items, else all of them in list order
     (``repeat=False``, Dassl's default);
  4. train is drawn with K, then val with min(K, 4), from the same stream.

  A ``random.Random(seed)`` instance produces the stream ``random.seed(seed)`` produces, so the draw is
  identical without touching global state. Unreadable images cannot be replaced without changing the draw:
  they are an error (``allow_fewer`` drops them with a warning). The draw depends on the order of the split list:
  for the split-file datasets that is the file's order, as in CoOp; CoOp's ImageNet lists each class folder in
  ``os.listdir`` order (file-system dependent) and fewclip holds training images out as val, so there only an
  imported pickle (``caches.data.coop_pickle``) gives CoOp's images.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from caches.data.records import DatasetError, ImageDataset, Sample
from caches.store import cache_writes

log = logging.getLogger(__name__)


@dataclass
class FewShotSplit:
    """The sampled ids: ``train`` (K per class) and ``val`` (min(K, 4) per class).

    ``fewclip`` draws list the ids in class order; ``dassl`` draws in Dassl's order (groups in order of first
    appearance, each group in the order ``random.sample`` returned it). ``source`` says where they came from:
    ``fewclip``, ``dassl`` or ``import:<path>`` (a CoOp pickle).
    """

    dataset: str
    shots: int
    seed: int
    train: list[str]
    val: list[str]
    skipped_unreadable: list[str]
    data_digest: str
    source: str = "fewclip"
    notes: list[str] = field(default_factory=list)

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


SAMPLERS = ("fewclip", "dassl")


def dassl_draw(samples: Sequence[Sample], per_class: int, rng: random.Random) -> list[Sample]:
    """One call of Dassl's ``generate_fewshot_dataset(samples, num_shots=per_class)`` (``repeat=False``).

    Groups by label in order of first appearance; ``rng.sample(group, per_class)`` for groups with enough items,
    the whole group otherwise. Consumes ``rng`` exactly as Dassl consumes the global ``random``.
    """
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.label, []).append(s)
    out: list[Sample] = []
    for items in groups.values():
        out += rng.sample(items, per_class) if len(items) >= per_class else items
    return out


def _dassl_split(dataset: ImageDataset, draw_from: ImageDataset, shots: int, seed: int, val_per_class: int,
                 allow_fewer: bool, check_readable: bool) -> FewShotSplit:
    rng = random.Random(seed)
    # Dassl draws over the whole split list before CoOp's subsample_classes: with dataset.subsample=base/new the
    # draw runs over the full dataset (``draw_from``) and only then keeps this dataset's ids.
    train = dassl_draw(draw_from.splits["train"], shots, rng)
    val = dassl_draw(draw_from.splits["val"], val_per_class, rng)
    # Back to this dataset's own samples (its labels: relabelled from 0 for a class subset).
    own = {split: {s.id: s for s in dataset.splits[split]} for split in ("train", "val")}
    train = [own["train"][s.id] for s in train if s.id in own["train"]]
    val = [own["val"][s.id] for s in val if s.id in own["val"]]
    skipped: list[str] = []
    notes: list[str] = []
    for what, drawn, k in (("train", train, shots), ("val", val, val_per_class)):
        counts: dict[int, int] = {}
        for s in drawn:
            counts[s.label] = counts.get(s.label, 0) + 1
        short = {dataset.classnames[c]: n for c, n in counts.items() if n < k}
        if short:
            msg = f"{what}: {len(short)} classes have fewer than {k} images, Dassl keeps all of them: {short}"
            if what == "train" and not allow_fewer:
                raise DatasetError(msg + ". Lower shots=, or pass fewshot.allow_fewer=true to take all of them.")
            log.warning("%s", msg)
            notes.append(msg)
        if check_readable:
            bad = [s.id for s in drawn if not dataset.is_readable(s)]
            if bad:
                msg = (f"{what}: {len(bad)} drawn images are unreadable ({bad[:3]}); the Dassl draw cannot replace "
                       "them without changing every later draw")
                if not allow_fewer:
                    raise DatasetError(msg + ". Fix the files, or pass fewshot.allow_fewer=true to drop them.")
                log.warning("%s: dropped", msg)
                notes.append(msg + ": dropped")
                skipped += bad
    train = [s for s in train if s.id not in skipped]
    val = [s for s in val if s.id not in skipped]
    if not val:
        raise DatasetError(f"dataset {dataset.name}: the val split is empty; hyperparameters need val data")
    digest = dataset.sample_digest(dataset.splits["train"] + dataset.splits["val"])
    return FewShotSplit(dataset.name, shots, seed, [s.id for s in train], [s.id for s in val], skipped, digest,
                        source="dassl", notes=notes)


def sample_fewshot(
    dataset: ImageDataset,
    shots: int,
    seed: int,
    allow_fewer: bool = False,
    check_readable: bool = True,
    sampler: str = "fewclip",
    val_per_class: int | None = None,
    draw_from: ImageDataset | None = None,
) -> FewShotSplit:
    """Draw K shots per class from train and min(K, 4) per class from val.

    ``allow_fewer``: a class with fewer than K usable training images is an error by default (the protocol
    would silently change); with True all its images are taken and a warning is logged. Val always takes
    what there is, with a warning, since it only ranks hyperparameters.

    ``sampler``: ``fewclip`` or ``dassl`` (see the module docstring). ``val_per_class`` overrides min(K, 4).
    ``draw_from`` (``dassl`` only): the dataset whose split lists are drawn from when ``dataset`` is a class
    subset of it (base-to-novel), as Dassl draws before CoOp subsamples the classes.
    """
    if shots < 1:
        raise DatasetError(f"shots must be >= 1, got {shots}")
    if sampler not in SAMPLERS:
        raise DatasetError(f"fewshot.sampler must be one of {SAMPLERS}, got '{sampler}'")
    n_val = val_shots(shots) if val_per_class is None else int(val_per_class)
    if sampler == "dassl":
        return _dassl_split(dataset, draw_from or dataset, shots, seed, n_val, allow_fewer, check_readable)
    rng = np.random.default_rng(seed)
    skipped: list[str] = []
    train = _draw(dataset, dataset.splits["train"], shots, rng, "train", allow_fewer, check_readable, skipped)
    val = _draw(dataset, dataset.splits["val"], n_val, rng, "val", True, check_readable, skipped)
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
    tag = "" if split.source == "fewclip" else ("dassl-" if split.source == "dassl" else "import-")
    path = d / f"fewshot-{tag}k{split.shots}-s{split.seed}-{split.data_digest}.json"
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


def select(dataset: ImageDataset, split: str | Sequence[str], ids: list[str]) -> list[Sample]:
    """The samples with the given ids, in the order of ``ids``, looked up in ``split`` (or several splits).

    Several splits serve imported draws whose train images the dataset keeps in val (ImageNet's val is carved
    from train).
    """
    splits = [split] if isinstance(split, str) else list(split)
    index = {s.id: s for name in splits for s in dataset.splits[name]}
    missing = [i for i in ids if i not in index]
    if missing:
        raise DatasetError(f"{len(missing)} ids not found in split {'/'.join(splits)}: {missing[:3]}")
    return [index[i] for i in ids]
