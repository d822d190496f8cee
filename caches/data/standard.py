"""The standard few-shot benchmarks, read from CoOp's on-disk layouts (KaiyangZhou/CoOp ``DATASETS.md``).

One generic reader serves the ten datasets that ship CoOp's ``split_zhou_<Name>.json`` (lists of
``[path relative to the image folder, label, classname]`` under ``train``/``val``/``test``); FGVCAircraft reads
its original split files; ImageNet reads the official ``train``/``val`` folders with ``classnames.txt``, uses
val as the test split and carves its validation images from train (never from test). ImageNet-V2, -Sketch,
-A and -R are evaluation-only targets mapped to ImageNet's labels.

Each ``conf/dataset/<name>.yaml`` is a call of one of these functions with the dataset's folder names,
templates and class-name fixes as data.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from caches.data.records import (
    IMAGE_EXTENSIONS,
    SPLITS,
    DatasetError,
    ImageDataset,
    Sample,
    stratified_split,
    subsample_classes,
)

log = logging.getLogger(__name__)

GENERATED_PREFIX = "split_fewclip_"


def _need_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what}: folder {path} is missing.\nExpected layout:\n{layout}")
    return path


def _need_file(path: Path, what: str, layout: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{what}: file {path} is missing.\nExpected layout:\n{layout}")
    return path


def _clean(name: str) -> str:
    return name.replace("_", " ").strip()


def _read_split_json(path: Path, image_dir: Path, what: str) -> tuple[dict[str, list[Sample]], list[str]]:
    """CoOp's split JSON -> samples per split and class names ordered by label."""
    try:
        data = json.loads(path.read_text())
        names: dict[int, str] = {}
        splits: dict[str, list[Sample]] = {}
        for split in SPLITS:
            out = []
            for rel, label, cname in data[split]:
                label = int(label)
                if names.setdefault(label, cname) != cname:
                    raise DatasetError(f"{what}: label {label} is both '{names[label]}' and '{cname}' in {path}")
                out.append(Sample(id=str(rel), label=label, path=str(image_dir / rel)))
            splits[split] = out
    except DatasetError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise DatasetError(
            f"{what}: {path} is not a split file: expected JSON {{'train'|'val'|'test': "
            f"[[relative path, label, classname], ...]}} ({type(e).__name__}: {e})"
        ) from e
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{what}: labels in {path} are not 0..C-1: {sorted(names)[:5]}...")
    return splits, [names[i] for i in range(len(names))]


def _class_of(rel_dir: str) -> str:
    # SUN397-style nesting ("a/apartment_building/outdoor"): drop one-letter index folders, join the rest.
    parts = [p for p in Path(rel_dir).parts if len(p) > 1]
    return " ".join(_clean(p) for p in parts)


def _generate_split(image_dir: Path, out: Path, fractions: Sequence[float], seed: int, what: str,
                    classname_map: dict[str, str] | None, ignore: Sequence[str]) -> None:
    """Split a class-folder image tree (seeded, stratified) and save it in CoOp's JSON format."""
    files = sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    by_dir: dict[str, list[Path]] = {}
    for f in files:
        rel_dir = str(f.parent.relative_to(image_dir))
        if rel_dir != "." and Path(rel_dir).parts[0] not in ignore:
            by_dir.setdefault(rel_dir, []).append(f)
    if not by_dir:
        raise DatasetError(
            f"{what}: no split file and no class folders under {image_dir} to generate one from. This dataset "
            "needs its split file (see CoOp's DATASETS.md)."
        )
    dirs = sorted(by_dir)
    cmap = classname_map or {}
    rows = [(str(f.relative_to(image_dir)), label, cmap.get(d, _class_of(d)))
            for label, d in enumerate(dirs) for f in by_dir[d]]
    parts = stratified_split([r[1] for r in rows], fractions, seed)
    payload = {split: [list(rows[i]) for i in part] for split, part in zip(SPLITS, parts)}
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, out)
    log.warning("%s: no standard split file; generated a seeded stratified split (seed %d) and saved it to %s. "
                "Results on it are NOT comparable with published numbers.", what, seed, out)


def coop_split(
    root: str,
    folder: str,
    image_dir: str,
    split_file: str,
    templates: Sequence[str],
    name: str,
    classname_map: dict[str, str] | None = None,
    ignore_folders: Sequence[str] = (),
    fractions: Sequence[float] = (0.5, 0.2, 0.3),
    split_seed: int = 1,
    subsample: str = "all",
) -> ImageDataset:
    """A dataset laid out as ``ROOT/<folder>/<image_dir>/...`` + ``ROOT/<folder>/<split_file>``.

    Without the split file, a seeded stratified split of the class folders under ``image_dir`` is generated
    once, saved beside it as ``split_fewclip_<...>.json`` and marked ``split_source: generated``.
    """
    base = Path(root).expanduser() / str(folder)
    image_dir = str(image_dir)  # YAML reads EuroSAT's "2750" as a number
    layout = f"  {base}/\n  |-- {image_dir}/\n  |__ {split_file}"
    _need_dir(base, name, layout)
    images = _need_dir(base / image_dir, name, layout)
    standard = base / split_file
    generated = base / (GENERATED_PREFIX + split_file.removeprefix("split_zhou_"))
    if standard.is_file():
        split_path, source = standard, "standard"
    else:
        if not generated.is_file():
            _generate_split(images, generated, fractions, split_seed, name, classname_map, ignore_folders)
        split_path, source = generated, "generated"
    splits, classnames = _read_split_json(split_path, images, name)
    ds = ImageDataset(
        name=name,
        classnames=[_clean(c) for c in classnames],
        templates=list(templates),
        splits=splits,
        source={"kind": "coop-split", "root": str(base.resolve()), "split_file": split_path.name,
                "split_source": source},
    )
    return subsample_classes(ds, subsample)


def fgvc_aircraft(root: str, templates: Sequence[str], name: str = "fgvc_aircraft",
                  folder: str = "fgvc_aircraft", subsample: str = "all") -> ImageDataset:
    """FGVCAircraft from its original files: ``variants.txt`` and ``images_variant_{train,val,test}.txt``."""
    base = Path(root).expanduser() / folder
    layout = (f"  {base}/\n  |-- images/          (<id>.jpg)\n  |-- variants.txt\n"
              "  |__ images_variant_train.txt, images_variant_val.txt, images_variant_test.txt")
    _need_dir(base, name, layout)
    images = _need_dir(base / "images", name, layout)
    variants = [v.strip() for v in _need_file(base / "variants.txt", name, layout).read_text().splitlines()
                if v.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    splits = {}
    for split in SPLITS:
        rows = []
        for line in _need_file(base / f"images_variant_{split}.txt", name, layout).read_text().splitlines():
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise DatasetError(f"{name}: variant '{variant}' of image {image_id} is not in variants.txt")
            rows.append(Sample(id=f"{image_id}.jpg", label=label_of[variant], path=str(images / f"{image_id}.jpg")))
        splits[split] = rows
    ds = ImageDataset(name=name, classnames=variants, templates=list(templates), splits=splits,
                      source={"kind": "fgvc-aircraft", "root": str(base.resolve()), "split_source": "standard"})
    return subsample_classes(ds, subsample)


def read_imagenet_classnames(path: Path, what: str) -> dict[str, str]:
    """``classnames.txt``: one ``<wnid> <class name>`` per line, in label order."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            wnid, _, cname = line.strip().partition(" ")
            out[wnid] = cname.strip()
    if not out:
        raise DatasetError(f"{what}: {path} lists no classes")
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def imagenet(root: str, templates: Sequence[str], name: str = "imagenet", folder: str = "imagenet",
             val_per_class: int = 10, split_seed: int = 1, subsample: str = "all") -> ImageDataset:
    """ImageNet: ``images/train/<wnid>/`` for shots, ``images/val/<wnid>/`` as the test split.

    ImageNet has no labelled val set besides the official one used as test, so ``val_per_class`` training
    images per class are set aside (seeded) as the validation split: hyperparameters never see test.
    """
    base = Path(root).expanduser() / folder
    layout = (f"  {base}/\n  |-- images/\n  |   |-- train/   (1,000 folders like n01440764)\n"
              "  |   |__ val/     (same folders)\n  |__ classnames.txt   ('<wnid> <class name>' per line)")
    _need_dir(base, name, layout)
    names = read_imagenet_classnames(_need_file(base / "classnames.txt", name, layout), name)
    wnids = list(names)
    label_of = {w: i for i, w in enumerate(wnids)}
    split_dirs = {"train": _need_dir(base / "images" / "train", name, layout),
                  "test": _need_dir(base / "images" / "val", name, layout)}
    samples: dict[str, list[Sample]] = {}
    for split, d in split_dirs.items():
        rows = []
        for sub in sorted(p for p in d.iterdir() if p.is_dir()):
            if sub.name not in label_of:
                raise DatasetError(f"{name}: folder {sub} is not listed in classnames.txt")
            rows += [Sample(id=f"{split_dirs[split].name}/{sub.name}/{f.name}", label=label_of[sub.name],
                            path=str(f)) for f in _image_files(sub)]
        samples[split] = rows
    rng = np.random.default_rng(split_seed)
    train, val = [], []
    by_class: dict[int, list[Sample]] = {}
    for s in samples["train"]:
        by_class.setdefault(s.label, []).append(s)
    for c in sorted(by_class):
        pool = by_class[c]
        held = set(rng.permutation(len(pool))[: min(val_per_class, len(pool) // 2)].tolist())
        for i, s in enumerate(pool):
            (val if i in held else train).append(s)
    ds = ImageDataset(
        name=name, classnames=[names[w] for w in wnids], templates=list(templates),
        splits={"train": train, "val": val, "test": samples["test"]},
        source={"kind": "imagenet", "root": str(base.resolve()), "split_source": "standard",
                "val": f"{val_per_class} per class carved from train (seed {split_seed})"},
    )
    return subsample_classes(ds, subsample)


def imagenet_target(root: str, templates: Sequence[str], name: str, folder: str, image_dir: str,
                    class_folders: str = "wnid", subsample: str = "all") -> ImageDataset:
    """An evaluation-only ImageNet variant (test split only), labelled in ImageNet's label order.

    ``class_folders``: ``wnid`` (Sketch, A, R: one folder per WordNet id, possibly a 200-class subset) or
    ``index`` (ImageNet-V2: folders ``0``..``999``). ``parent_labels`` maps each class to ImageNet's label so
    an adapter fitted on ImageNet is scored on the subset's logits only.
    """
    base = Path(root).expanduser() / folder
    layout = (f"  {base}/\n  |-- {image_dir}/   (class folders: "
              f"{'0..999' if class_folders == 'index' else 'WordNet ids like n01440764'})\n"
              "  |__ classnames.txt   (copied from imagenet/)")
    _need_dir(base, name, layout)
    names = read_imagenet_classnames(_need_file(base / "classnames.txt", name, layout), name)
    wnids = list(names)
    images = _need_dir(base / image_dir, name, layout)
    subdirs = sorted((p for p in images.iterdir() if p.is_dir()),
                     key=(lambda p: int(p.name)) if class_folders == "index" else (lambda p: p.name))
    parents, rows = [], []
    for sub in subdirs:
        if class_folders == "index":
            parent = int(sub.name)
            if not 0 <= parent < len(wnids):
                raise DatasetError(f"{name}: class folder {sub} is outside 0..{len(wnids) - 1}")
        elif sub.name in names:
            parent = wnids.index(sub.name)
        else:
            raise DatasetError(f"{name}: folder {sub} is not a WordNet id listed in classnames.txt")
        label = len(parents)
        parents.append(parent)
        rows += [Sample(id=f"{sub.name}/{f.name}", label=label, path=str(f)) for f in _image_files(sub)]
    if not parents:
        raise DatasetError(f"{name}: no class folders under {images}.\nExpected layout:\n{layout}")
    ds = ImageDataset(
        name=name, classnames=[names[wnids[p]] for p in parents], templates=list(templates),
        splits={"train": [], "val": [], "test": rows}, parent_labels=parents,
        source={"kind": "imagenet-target", "root": str(base.resolve()), "split_source": "standard"},
    )
    return subsample_classes(ds, subsample)
