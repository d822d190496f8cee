"""Dataset readers: the embedded sklearn digits demo set and the user's image folders.

Each reader is a plain function returning an ``ImageDataset``; ``conf/dataset/*.yaml`` points at one with
Hydra's ``_target_``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from caches.data.records import (
    IMAGE_EXTENSIONS,
    SPLITS,
    DatasetError,
    ImageDataset,
    Sample,
    classname_from_folder,
    stratified_split,
    subsample_classes,
)

log = logging.getLogger(__name__)

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FOLDER_LAYOUT = (
    "Expected either\n"
    "  ROOT/<class_name>/<image>.jpg            (split into train/val/test by dataset.fractions)\n"
    "or\n"
    "  ROOT/train/<class_name>/<image>.jpg, ROOT/test/<class_name>/..., optional ROOT/val/<class_name>/...\n"
    f"Image extensions: {', '.join(IMAGE_EXTENSIONS)}"
)


@dataclass
class DigitsDataset(ImageDataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped inside the package."""

    images: np.ndarray | None = None  # [N, 8, 8] uint8

    def load_image(self, sample: Sample) -> Image.Image:
        idx = int(sample.id.split("/")[1])
        return Image.fromarray(self.images[idx], mode="L").convert("RGB")


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fr = [float(f) for f in fractions]
    if len(fr) != 3:
        raise DatasetError(f"dataset.fractions needs three numbers (train, val, test), got {fr}")
    return fr


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``([N, 8, 8] uint8, [N] int)``, read once per process (parsing sklearn's file takes 0.2 s per sweep job)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    # Grey levels run 0..16; stretch to 0..255 so the images look like ordinary photographs to the encoder.
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(int)
    images.flags.writeable = labels.flags.writeable = False  # shared by every dataset object of the process
    return images, labels


def load_digits(
    templates: Sequence[str],
    fractions: Sequence[float] = (0.5, 0.2, 0.3),
    split_seed: int = 0,
    name: str = "digits",
    subsample: str = "all",
) -> DigitsDataset:
    """The embedded demo set, split train/val/test by a seeded stratified split."""
    import sklearn

    images, labels = _digits_arrays()
    parts = stratified_split(labels, _check_fractions(fractions), split_seed)
    splits = {
        split: [Sample(id=f"digits/{i}", label=int(labels[i])) for i in part]
        for split, part in zip(SPLITS, parts)
    }
    ds = DigitsDataset(
        name=name,
        classnames=list(DIGIT_NAMES),
        templates=list(templates),
        splits=splits,
        source={"kind": "sklearn-digits", "sklearn": sklearn.__version__, "fractions": list(fractions),
                "split_seed": split_seed, "split_source": "generated"},
        in_memory=True,
        images=images,
    )
    return subsample_classes(ds, subsample)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_folder(
    root: str | None,
    templates: Sequence[str],
    fractions: Sequence[float] = (0.5, 0.2, 0.3),
    split_seed: int = 0,
    name: str = "folder",
    subsample: str = "all",
) -> ImageDataset:
    """The user's own images, one sub-folder per class.

    Layouts: ``ROOT/<class>/*`` (split by a seeded stratified split with ``fractions`` for train/val/test),
    or ``ROOT/train/<class>/*`` + ``ROOT/test/<class>/*`` (+ optional ``ROOT/val/<class>/*``; without it,
    val is carved from train with the val share of ``fractions``). Class names are the folder names with
    ``_`` turned into spaces, sorted by folder name.
    """
    if not root:
        raise DatasetError(f"dataset={name} needs dataset.root=PATH.\n{FOLDER_LAYOUT}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetError(f"dataset root {base} does not exist or is not a folder.\n{FOLDER_LAYOUT}")
    fr = _check_fractions(fractions)
    pre_split = (base / "train").is_dir() and (base / "test").is_dir()
    split_dirs = {s: base / s for s in SPLITS if (base / s).is_dir()} if pre_split else {"all": base}
    folders = _class_folders(split_dirs["train" if pre_split else "all"])
    if not folders:
        raise DatasetError(f"no class folders under {split_dirs.get('train', base)}.\n{FOLDER_LAYOUT}")
    label_of = {f: i for i, f in enumerate(folders)}

    def collect(folder: Path) -> list[Sample]:
        out = []
        for cls in _class_folders(folder):
            if cls not in label_of:
                raise DatasetError(f"class folder {folder / cls} does not exist in the train split")
            files = _list_images(folder / cls)
            if not files:
                raise DatasetError(f"class folder {folder / cls} holds no images.\n{FOLDER_LAYOUT}")
            out += [Sample(id=str(p.relative_to(base)), label=label_of[cls], path=str(p)) for p in files]
        return out

    if pre_split:
        splits = {s: collect(d) for s, d in split_dirs.items()}
        source_kind = "folder-train-val-test" if "val" in splits else "folder-train-test"
        if "val" not in splits:
            train = splits["train"]
            tr_share = fr[0] / (fr[0] + fr[1])
            tr_idx, va_idx = stratified_split([s.label for s in train], [tr_share, 1 - tr_share], split_seed)
            splits["train"] = [train[i] for i in tr_idx]
            splits["val"] = [train[i] for i in va_idx]
        split_source = "given" if source_kind == "folder-train-val-test" else "given-train-test+generated-val"
    else:
        everything = collect(base)
        parts = stratified_split([s.label for s in everything], fr, split_seed)
        splits = {s: [everything[i] for i in part] for s, part in zip(SPLITS, parts)}
        source_kind, split_source = "folder-classes", "generated"
    missing = [s for s in ("train", "test") if not {x.label for x in splits[s]} >= set(range(len(folders)))]
    if missing:
        log.warning("dataset %s: some classes have no images in %s", name, missing)
    ds = ImageDataset(
        name=name,
        classnames=[classname_from_folder(f) for f in folders],
        templates=list(templates),
        splits=splits,
        source={"kind": source_kind, "root": str(base.resolve()), "fractions": fr, "split_seed": split_seed,
                "split_source": split_source},
    )
    return subsample_classes(ds, subsample)


FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), gzip-compressed or not."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: {body.size} bytes of data for shape {shape} (truncated?)")
    return body.reshape(shape)


@dataclass
class ArrayDataset(ImageDataset):
    """Images kept in memory as a ``[N, H, W]`` uint8 array; sample ids are ``<split>/<row>``."""

    arrays: dict[str, np.ndarray] | None = None

    def load_image(self, sample: Sample) -> Image.Image:
        split, row = sample.id.split("/")
        return Image.fromarray(self.arrays[split][int(row)], mode="L").convert("RGB")


def load_fashion_mnist(
    root: str,
    templates: Sequence[str],
    val_fraction: float = 1 / 6,
    split_seed: int = 1,
    name: str = "fashion_mnist",
    subsample: str = "all",
) -> ArrayDataset:
    """Fashion-MNIST from its IDX files (``train-*`` 60k, ``t10k-*`` 10k; ``.gz`` or not).

    The official test set is the test split; ``val_fraction`` of train (stratified, seeded) is the val split.
    Debian's ``dataset-fashion-mnist`` package installs the files in ``/usr/share/datasets/fashion-mnist``.
    """
    base = Path(root).expanduser()
    layout = "  " + "\n  ".join(f"{base}/{f}[.gz]" for pair in FASHION_FILES.values() for f in pair)
    if not base.is_dir():
        raise DatasetError(f"{name}: folder {base} is missing (apt-get install dataset-fashion-mnist, or set "
                           f"dataset.root).\nExpected:\n{layout}")

    def find(stem: str) -> Path:
        for cand in (base / f"{stem}.gz", base / stem):
            if cand.is_file():
                return cand
        raise DatasetError(f"{name}: {stem}[.gz] not found in {base}.\nExpected:\n{layout}")

    arrays, labels = {}, {}
    for split, (img, lab) in FASHION_FILES.items():
        arrays[split], labels[split] = read_idx(find(img)), read_idx(find(lab)).astype(int)
        if arrays[split].ndim != 3 or len(arrays[split]) != len(labels[split]):
            raise DatasetError(f"{name}: {split} images {arrays[split].shape} do not match labels "
                               f"{labels[split].shape}")
    tr, va = stratified_split(labels["train"], [1 - val_fraction, val_fraction], split_seed)
    splits = {
        "train": [Sample(f"train/{i}", int(labels["train"][i])) for i in tr],
        "val": [Sample(f"train/{i}", int(labels["train"][i])) for i in va],
        "test": [Sample(f"test/{i}", int(y)) for i, y in enumerate(labels["test"])],
    }
    ds = ArrayDataset(name=name, classnames=list(FASHION_CLASSES), templates=list(templates), splits=splits,
                      source={"kind": "fashion-mnist-idx", "root": str(base.resolve()), "split_source":
                              "standard test; val carved from train", "split_seed": split_seed},
                      in_memory=True, arrays=arrays)
    return subsample_classes(ds, subsample)


def _lines(numbers: Sequence[int]) -> str:
    """``line 3`` / ``lines 3, 7, 9 and 4 more``: where in a file something is."""
    shown = ", ".join(str(n) for n in numbers[:5])
    more = f" and {len(numbers) - 5} more" if len(numbers) > 5 else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def _dedupe_rows(name: str, file: Path, rows: list[tuple[int, str, str, str]]) -> list[tuple[int, str, str, str]]:
    """Rows naming one image file more than once: identical ones (same label and split) are dropped with a
    warning; different labels or splits are an error (the image would be scored in test under one label after
    training under another)."""
    by_file: dict[Path, list[tuple[int, str, str, str]]] = {}
    for r in rows:
        by_file.setdefault((file.parent / r[1]).resolve(), []).append(r)
    conflicts = [group for group in by_file.values() if len({(r[2], r[3]) for r in group}) > 1]
    if conflicts:
        shown = "; ".join(f"{g[0][1]} on {_lines([r[0] for r in g])} as " + " / ".join(
            f"'{r[2]}'" + (f" ({r[3]})" if r[3] else "") for r in g) for g in conflicts[:3])
        raise DatasetError(f"{name}: {file} lists {len(conflicts)} images more than once with different labels or "
                           f"splits: {shown}")
    repeated = [group for group in by_file.values() if len(group) > 1]
    if not repeated:
        return rows
    dropped = sum(len(g) - 1 for g in repeated)
    log.warning("%s: %s lists %d images more than once with the same label and split (e.g. %s on %s): %d duplicate "
                "rows ignored", name, file, len(repeated), repeated[0][0][1], _lines([r[0] for r in repeated[0]]),
                dropped)
    return [group[0] for group in by_file.values()]


def load_csv(
    path: str | None,
    templates: Sequence[str],
    fractions: Sequence[float] = (0.5, 0.2, 0.3),
    split_seed: int = 0,
    name: str = "csv",
    subsample: str = "all",
) -> ImageDataset:
    """A CSV with columns ``path,label`` and an optional ``split`` (train/val/test); paths relative to the CSV.

    Labels are class names (strings); classes are sorted by name. Without a ``split`` column the rows are
    split by a seeded stratified split with ``fractions``.
    """
    import csv

    layout = ("  path,label[,split]\n  images/0001.jpg,golden retriever,train\n  ...\n"
              "(paths relative to the CSV file; split one of train/val/test)")
    if not path:
        raise DatasetError(f"dataset={name} needs dataset.path=FILE.csv\nExpected:\n{layout}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetError(f"{name}: CSV file {file} does not exist.\nExpected:\n{layout}")
    with open(file, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        if not {"path", "label"} <= cols:
            raise DatasetError(f"{name}: {file} has columns {sorted(cols)}; needs path and label.\n{layout}")
        # (line number, path, label, split); a row whose every field is empty is a blank line.
        rows = [(reader.line_num, (r.get("path") or "").strip(), (r.get("label") or "").strip(),
                 (r.get("split") or "").strip()) for r in reader if any((v or "").strip() for v in r.values()
                                                                        if isinstance(v, str))]
    if not rows:
        raise DatasetError(f"{name}: {file} has no rows")
    for what, col in (("path", 1), ("label", 2)):
        empty = [r[0] for r in rows if not r[col]]
        if empty:
            raise DatasetError(f"{name}: {file}: empty {what} on {_lines(empty)}")
    rows = _dedupe_rows(name, file, rows)
    classes = sorted({r[2] for r in rows})
    label_of = {c: i for i, c in enumerate(classes)}
    samples = [Sample(id=p, label=label_of[lb], path=str((file.parent / p).resolve())) for _, p, lb, _ in rows]
    if "split" in cols:
        bad = sorted({r[3] for r in rows} - set(SPLITS))
        if bad:
            lines = [r[0] for r in rows if r[3] not in SPLITS]
            raise DatasetError(f"{name}: unknown split values {bad} in {file} ({_lines(lines)}); use train/val/test")
        splits = {s: [x for x, r in zip(samples, rows) if r[3] == s] for s in SPLITS}
        split_source = "given"
    else:
        parts = stratified_split([s.label for s in samples], _check_fractions(fractions), split_seed)
        splits = {s: [samples[i] for i in part] for s, part in zip(SPLITS, parts)}
        split_source = "generated"
    ds = ImageDataset(name=name, classnames=[classname_from_folder(c) for c in classes], templates=list(templates),
                      splits=splits, source={"kind": "csv", "file": str(file.resolve()), "split_source": split_source,
                                             "split_seed": split_seed})
    return subsample_classes(ds, subsample)
