"""Generate tiny copies of every supported on-disk dataset layout (a few classes, a few small images each)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from fewclip.config import conf_dir

COOP = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "sun397", "dtd", "eurosat",
        "ucf101"]
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"]
WNID_NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray"]


def _image(path: Path, cls: int, rng: np.random.Generator, size: int = 20) -> None:
    arr = np.zeros((size, size, 3))
    arr[..., cls % 3] = 180 + 10 * (cls // 3)
    arr = np.clip(arr + rng.normal(0, 25, arr.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def yaml(name: str):
    return OmegaConf.load(conf_dir() / "dataset" / f"{name}.yaml")


def make_coop(root: Path, name: str, n_classes: int = 4, per_split=(6, 3, 3), write_split: bool = True) -> Path:
    """ROOT/<folder>/<image_dir>/<class>/<i>.jpg and (optionally) CoOp's split JSON."""
    cfg = yaml(name)
    base = root / cfg.folder
    images = base / str(cfg.image_dir)
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for c in range(n_classes):
        cname = f"class_{c}"
        for s, n in zip(split, per_split):
            for i in range(n):
                rel = f"{cname}/{s}_{i}.jpg"
                _image(images / rel, c, rng)
                split[s].append([rel, c, cname])
    if write_split:
        (base / cfg.split_file).write_text(json.dumps(split))
    return base


def make_fgvc(root: Path, n_classes: int = 4, per_split=(6, 3, 3)) -> Path:
    base = root / yaml("fgvc_aircraft").folder
    rng = np.random.default_rng(1)
    variants = [f"7{c}7-200" for c in range(n_classes)]
    (base / "variants.txt").parent.mkdir(parents=True, exist_ok=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    k = 0
    for s, n in zip(("train", "val", "test"), per_split):
        lines = []
        for c in range(n_classes):
            for _ in range(n):
                k += 1
                _image(base / "images" / f"{k:07d}.jpg", c, rng)
                lines.append(f"{k:07d} {variants[c]}")
        (base / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")
    return base


def make_imagenet(root: Path, per_class=(16, 3)) -> Path:
    base = root / yaml("imagenet").folder
    rng = np.random.default_rng(2)
    base.mkdir(parents=True, exist_ok=True)
    (base / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, WNID_NAMES)))
    for split, n in zip(("train", "val"), per_class):
        for c, w in enumerate(WNIDS):
            for i in range(n):
                _image(base / "images" / split / w / f"{w}_{i}.JPEG", c, rng)
    return base


def make_imagenet_targets(root: Path, subset=(1, 3, 4), n: int = 3) -> None:
    rng = np.random.default_rng(3)
    for name in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        cfg = yaml(name)
        base = root / cfg.folder
        base.mkdir(parents=True, exist_ok=True)
        (base / "classnames.txt").write_text("".join(f"{w} {nm}\n" for w, nm in zip(WNIDS, WNID_NAMES)))
        classes = range(len(WNIDS)) if name in ("imagenet_v2", "imagenet_sketch") else subset
        for c in classes:
            folder = str(c) if cfg.class_folders == "index" else WNIDS[c]
            for i in range(n):
                _image(base / cfg.image_dir / folder / f"{i}.jpg", c, rng)


def _idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_fashion(root: Path, n_train: int = 120, n_test: int = 30) -> Path:
    rng = np.random.default_rng(4)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        imgs = np.clip(labels[:, None, None] * 20 + rng.normal(0, 10, (n, 28, 28)), 0, 255)
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def make_csv(root: Path, with_split: bool, n_classes: int = 3, n: int = 8) -> Path:
    rng = np.random.default_rng(5)
    lines = ["path,label" + (",split" if with_split else "")]
    for c in range(n_classes):
        for i in range(n):
            rel = f"pics/{c}_{i}.png"
            _image(root / rel, c, rng)
            split = "train" if i < 4 else "val" if i < 6 else "test"
            lines.append(f"{rel},kind {c}" + (f",{split}" if with_split else ""))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def make_all(root: Path) -> dict[str, list[str]]:
    """Every layout under ``root``; returns the dataset option -> extra overrides to load it."""
    for name in COOP:
        make_coop(root, name)
    make_fgvc(root)
    make_imagenet(root)
    make_imagenet_targets(root)
    fashion = make_fashion(root / "fashion")
    csv_file = make_csv(root / "csvdata", with_split=True)
    out = {name: [] for name in COOP + ["fgvc_aircraft", "imagenet", "imagenet_ens"]}
    out["fashion_mnist"] = [f"dataset.root={fashion}"]
    out["csv"] = [f"dataset.path={csv_file}"]
    return out
