"""Datasets, splits and the few-shot sampler."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_class_folder

from caches.data.datasets import load_digits, load_folder
from caches.data.fewshot import persist_fewshot, sample_fewshot, select, val_shots
from caches.data.records import DatasetError, stratified_split

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
