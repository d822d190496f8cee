"""Dataset readers: the embedded sklearn digits demo set and the user's image folders.

Each reader is a plain function returning an ``ImageDataset``; ``conf/dataset/*.yaml`` points at one with
Hydra's ``_target_``.
"""

from __future__ import annotations

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


def load_digits(
    templates: Sequence[str],
    fractions: Sequence[float] = (0.5, 0.2, 0.3),
    split_seed: int = 0,
    name: str = "digits",
) -> DigitsDataset:
    """The embedded demo set, split train/val/test by a seeded stratified split."""
    import sklearn
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    # Grey levels run 0..16; stretch to 0..255 so the images look like ordinary photographs to the encoder.
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(int)
    parts = stratified_split(labels, _check_fractions(fractions), split_seed)
    splits = {
        split: [Sample(id=f"digits/{i}", label=int(labels[i])) for i in part]
        for split, part in zip(SPLITS, parts)
    }
    return DigitsDataset(
        name=name,
        classnames=list(DIGIT_NAMES),
        templates=list(templates),
        splits=splits,
        source={"kind": "sklearn-digits", "sklearn": sklearn.__version__, "fractions": list(fractions),
                "split_seed": split_seed, "split_source": "generated"},
        in_memory=True,
        images=images,
    )


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
    return ImageDataset(
        name=name,
        classnames=[classname_from_folder(f) for f in folders],
        templates=list(templates),
        splits=splits,
        source={"kind": source_kind, "root": str(base.resolve()), "fractions": fr, "split_seed": split_seed,
                "split_source": split_source},
    )
