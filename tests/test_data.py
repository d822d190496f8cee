"""Datasets, splits and the few-shot sampler."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import make_class_folder
from PIL import Image

from caches.data.check import check_dataset
from caches.data.datasets import load_csv, load_digits, load_folder
from caches.data.fewshot import persist_fewshot, sample_fewshot, select, val_shots
from caches.data.records import (
    DatasetError,
    ImageDataset,
    Sample,
    UnsupportedImageError,
    check_trainable,
    stratified_split,
    to_rgb,
)

T = ["a photo of a {}."]


def test_stratified_split_is_a_seeded_balanced_partition():
    labels = [0] * 10 + [1] * 20 + [2] * 7
    parts = stratified_split(labels, [0.5, 0.2, 0.3], seed=3)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(labels)))  # a partition: nothing lost, nothing twice
    for c, n in Counter(labels).items():
        counts = [sum(labels[i] == c for i in p) for p in parts]
        assert sum(counts) == n and min(counts) >= 1
        assert abs(counts[0] - 0.5 * n) <= 1.5
    assert parts == stratified_split(labels, [0.5, 0.2, 0.3], seed=3)
    assert parts != stratified_split(labels, [0.5, 0.2, 0.3], seed=4)
    with pytest.raises(DatasetError):
        stratified_split(labels, [0.5, 0.6], seed=0)


def test_digits_dataset():
    ds = load_digits(T)
    assert ds.n_classes == 10 and ds.classnames[3] == "three"
    n = sum(len(v) for v in ds.splits.values())
    assert n == 1797
    ids = [s.id for v in ds.splits.values() for s in v]
    assert len(set(ids)) == n
    img = ds.load_image(ds.splits["train"][0])
    assert img.mode == "RGB" and img.size == (8, 8)


def test_folder_single_level_layout(class_folder):
    ds = load_folder(str(class_folder), T, fractions=[0.6, 0.2, 0.2], split_seed=1)
    assert ds.classnames == ["blue jay", "green tree", "red fox"]  # sorted folders, _ -> space
    sizes = {k: len(v) for k, v in ds.splits.items()}
    assert sizes == {"train": 18, "val": 6, "test": 6}
    all_ids = [s.id for v in ds.splits.values() for s in v]
    assert len(set(all_ids)) == 30
    for s in ds.splits["test"]:
        assert Path(s.path).parent.name.replace("_", " ") == ds.classnames[s.label]
    assert ds.source["split_source"] == "generated"


def test_folder_pre_split_layout(split_folder):
    ds = load_folder(str(split_folder), T)
    assert ds.classnames == ["cat", "dog"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 12, "val": 6, "test": 8}
    assert all(s.id.startswith("test/") for s in ds.splits["test"])
    assert ds.source["split_source"] == "given"


def test_folder_pre_split_without_val_carves_val_from_train(split_folder):
    import shutil

    shutil.rmtree(split_folder / "val")
    ds = load_folder(str(split_folder), T, fractions=[0.5, 0.5, 0.0])
    assert all(s.id.startswith("train/") for s in ds.splits["val"])
    assert not {s.id for s in ds.splits["val"]} & {s.id for s in ds.splits["train"]}
    assert len(ds.splits["val"]) == 6 and len(ds.splits["train"]) == 6


def test_folder_bad_input_messages(tmp_path):
    with pytest.raises(DatasetError, match="needs dataset.root"):
        load_folder(None, T)
    with pytest.raises(DatasetError, match="does not exist.*\n.*Expected"):
        load_folder(str(tmp_path / "nope"), T)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_folder(str(tmp_path / "empty"), T)
    root = make_class_folder(tmp_path / "x", {"a": 3})
    (root / "b").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        load_folder(str(root), T)


def test_fewshot_exactly_k_per_class_deterministic_and_disjoint_from_test():
    ds = load_digits(T)
    a = sample_fewshot(ds, 4, seed=1)
    b = sample_fewshot(ds, 4, seed=1)
    c = sample_fewshot(ds, 4, seed=2)
    assert a.train == b.train and a.val == b.val
    assert a.train != c.train
    train = select(ds, "train", a.train)
    assert Counter(s.label for s in train) == {k: 4 for k in range(10)}
    val = select(ds, "val", a.val)
    assert Counter(s.label for s in val) == {k: val_shots(4) for k in range(10)}
    test_ids = {s.id for s in ds.splits["test"]}
    assert not (set(a.train) | set(a.val)) & test_ids
    assert val_shots(16) == 4 and val_shots(2) == 2


def test_fewshot_persisted_as_json(tmp_path):
    ds = load_digits(T)
    fs = sample_fewshot(ds, 2, seed=3)
    path = persist_fewshot(fs, tmp_path)
    data = json.loads(path.read_text())
    assert data["train"] == fs.train and data["shots"] == 2 and data["seed"] == 3


def test_k_larger_than_a_class(class_folder):
    ds = load_folder(str(class_folder), T, fractions=[0.6, 0.2, 0.2])  # 6 train images per class
    with pytest.raises(DatasetError, match="has 6 usable images, 8 requested.*allow_fewer"):
        sample_fewshot(ds, 8, seed=1)
    fs = sample_fewshot(ds, 8, seed=1, allow_fewer=True)
    assert len(fs.train) == 18


def test_corrupt_image_is_replaced_by_the_next_draw(class_folder):
    ds = load_folder(str(class_folder), T, fractions=[0.6, 0.2, 0.2])
    clean = sample_fewshot(ds, 2, seed=5)
    victim = select(ds, "train", clean.train)[0]
    Path(victim.path).write_bytes(b"not an image")
    ds = load_folder(str(class_folder), T, fractions=[0.6, 0.2, 0.2])
    fs = sample_fewshot(ds, 2, seed=5)
    assert victim.id not in fs.train and victim.id in fs.skipped_unreadable
    assert Counter(s.label for s in select(ds, "train", fs.train)) == {0: 2, 1: 2, 2: 2}
    # the untouched classes keep the same draw
    same = [i for i in clean.train if select(ds, "train", [i])[0].label != victim.label]
    assert set(same) <= set(fs.train)


# ------------------------------------------------------------------------------- images of other bit depths
def test_16_bit_png_matches_its_8_bit_twin(tmp_path):
    """A 16-bit grey PNG (PIL mode I;16) is scaled by its bit depth, not clipped at 255 (which whitens it)."""
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 255 * 257 = 65535: the same image
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.9  # what convert("RGB") alone makes of it
    ds = ImageDataset("t", ["a"], T, {"train": [], "val": [], "test": []})
    eight = np.asarray(ds.load_image(Sample("g8", 0, str(tmp_path / "g8.png"))))
    sixteen = np.asarray(ds.load_image(Sample("g16", 0, str(tmp_path / "g16.png"))))
    assert sixteen.shape == (16, 16, 3) and sixteen.dtype == np.uint8
    np.testing.assert_array_equal(sixteen, eight)
    # Values between the 8-bit levels round to the nearest: v * 255 / 65535.
    grey16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "r16.png")
    with Image.open(tmp_path / "r16.png") as im:
        got = np.asarray(to_rgb(im))[..., 0]
    np.testing.assert_array_equal(got, np.rint(grey16 * (255 / 65535)).astype(np.uint8))


def test_float_and_32_bit_images_are_converted_or_refused():
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32))
    assert f.mode == "F"
    np.testing.assert_array_equal(np.asarray(to_rgb(f))[..., 0], [[0, 128], [255, 64]])
    with pytest.raises(UnsupportedImageError, match=r"values in \[0, 3\]"):
        to_rgb(Image.fromarray(np.array([[0.0, 3.0]], dtype=np.float32)))
    with pytest.raises(UnsupportedImageError, match="unknown bit depth"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))  # mode I, no file to tell its depth


# ----------------------------------------------------------------------------------------- CSV rows
def _csv(tmp_path: Path, lines: list[str]) -> Path:
    make_class_folder(tmp_path / "img", {"a": 3, "b": 3})
    path = tmp_path / "list.csv"
    path.write_text("\n".join(["path,label,split", *lines]) + "\n")
    return path


ROWS = [f"img/{c}/img{i:03d}.png,{c},{s}" for c in "ab" for i, s in enumerate(("train", "val", "test"))]


def test_csv_conflicting_duplicates_are_an_error_naming_the_lines(tmp_path):
    path = _csv(tmp_path, [*ROWS, "img/a/img000.png,b,test"])  # line 8: a training image again, in test as b
    with pytest.raises(DatasetError, match=r"img/a/img000.png on lines 2, 8 as 'a' \(train\) / 'b' \(test\)"):
        load_csv(str(path), T)
    path = _csv(tmp_path, [*ROWS, "./img/a/img000.png,a,test"])  # another spelling of the same file
    with pytest.raises(DatasetError, match="more than once with different labels or splits"):
        load_csv(str(path), T)


def test_csv_identical_duplicates_are_dropped_with_a_warning(tmp_path, caplog):
    path = _csv(tmp_path, [*ROWS, ROWS[0]])
    with caplog.at_level("WARNING"):
        ds = load_csv(str(path), T)
    assert "1 duplicate rows ignored" in caplog.text
    assert [s.id for s in ds.splits["train"]] == ["img/a/img000.png", "img/b/img000.png"]


def test_csv_empty_path_or_label_names_the_rows(tmp_path):
    with pytest.raises(DatasetError, match="empty path on lines 3, 5"):
        load_csv(str(_csv(tmp_path, [ROWS[0], ",a,val", ROWS[2], ",b,train", *ROWS[3:]])), T)
    with pytest.raises(DatasetError, match="empty label on line 2"):
        load_csv(str(_csv(tmp_path, ["img/a/img000.png,,train", *ROWS[1:]])), T)
    ds = load_csv(str(_csv(tmp_path, [ROWS[0], "", ",,", *ROWS[1:]])), T)  # blank lines are not rows
    assert sum(len(v) for v in ds.splits.values()) == len(ROWS)


def test_an_image_in_two_splits_is_refused():
    splits = {"train": [Sample("x", 0), Sample("y", 1)], "val": [Sample("z", 1)], "test": [Sample("x", 0)]}
    with pytest.raises(DatasetError, match=r"x in test \(label 0\), train \(label 0\)"):
        ImageDataset("t", ["a", "b"], T, splits)


def test_one_class_is_refused_for_fitting_and_by_data_check(tmp_path):
    ds = load_folder(str(make_class_folder(tmp_path / "one", {"only": 6})), T)
    with pytest.raises(DatasetError, match="has 1 class .* at least 2"):
        check_trainable(ds)
    assert any("a classifier needs at least 2" in p for p in check_dataset(ds, open_images=False).problems)
