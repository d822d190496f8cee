"""fewshot.sampler=dassl draws Dassl's images; fewshot.import reads CoOp's pickles and nothing else."""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
import types
from collections import defaultdict

import pytest

from caches.data.coop_pickle import import_fewshot, load_coop_pickle
from caches.data.fewshot import persist_fewshot, sample_fewshot
from caches.data.records import DatasetError, ImageDataset, Sample, subsample_classes


def synthetic_split(seed: int = 0, n_classes: int = 7) -> dict[str, list[list]]:
    """A CoOp-style split file whose classes are interleaved and out of label order, some smaller than 16."""
    rng = random.Random(seed)
    split: dict[str, list[list]] = {}
    for name, lo, hi in (("train", 9, 30), ("val", 2, 9), ("test", 2, 4)):
        rows = [[f"c{c}/{name}_{i}.jpg", c, f"class_{c}"] for c in range(n_classes)
                for i in range(rng.randint(lo, hi))]
        rng.shuffle(rows)
        split[name] = rows
    return split


def dataset_of(split: dict[str, list[list]], name: str = "synthetic") -> ImageDataset:
    n = 1 + max(r[1] for r in split["train"])
    return ImageDataset(name=name, classnames=[f"class {c}" for c in range(n)], templates=["a photo of a {}."],
                        splits={k: [Sample(id=r[0], label=r[1]) for r in v] for k, v in split.items()})


# ----------------------------------------------------------------------------- an independent Dassl, as written
class _Item:
    def __init__(self, impath: str, label: int) -> None:
        self.impath, self.label = impath, label


def dassl_reference(split: dict[str, list[list]], shots: int, seed: int) -> tuple[list[str], list[str]]:
    """Dassl's code path: set_random_seed, split_dataset_by_label (defaultdict), random.sample or all items,
    train with K then val with min(K, 4) (CoOp's datasets/*.py), on the module-level ``random``."""
    state = random.getstate()
    random.seed(seed)
    try:
        out = []
        for data_source, num_shots in ((split["train"], shots), (split["val"], min(shots, 4))):
            data_source = [_Item(r[0], r[1]) for r in data_source]
            tracker = defaultdict(list)
            for item in data_source:
                tracker[item.label].append(item)
            dataset = []
            for _label, items in tracker.items():
                if len(items) >= num_shots:
                    sampled_items = random.sample(items, num_shots)
                else:
                    sampled_items = items
                dataset.extend(sampled_items)
            out.append([d.impath for d in dataset])
        return out[0], out[1]
    finally:
        random.setstate(state)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_dassl_sampler_equals_dassl(seed, shots):
    split = synthetic_split(seed=10 + seed)
    ds = dataset_of(split)
    before = random.getstate()
    fs = sample_fewshot(ds, shots, seed, sampler="dassl", check_readable=False, allow_fewer=True)
    assert random.getstate() == before  # the global generator is never touched
    train, val = dassl_reference(split, shots, seed)
    assert fs.train == train and fs.val == val  # same images, same order
    assert fs.source == "dassl"
    # and not the fewclip sampler's draw (a different generator)
    if shots < 8:
        other = sample_fewshot(ds, shots, seed, check_readable=False, allow_fewer=True)
        assert sorted(other.train) != sorted(train)


def test_dassl_sampler_short_classes_need_allow_fewer():
    ds = dataset_of(synthetic_split(1))
    with pytest.raises(DatasetError, match="fewer than 16"):
        sample_fewshot(ds, 16, 1, sampler="dassl", check_readable=False)


def test_dassl_sampler_draws_before_the_class_subsample():
    """CoOp draws over every class, then subsample_classes keeps the base half: the base draw is not a draw over
    the base classes alone (the val draw follows the new classes' train draws)."""
    split = synthetic_split(5)
    full = dataset_of(split)
    base = subsample_classes(dataset_of(split), "base")
    fs = sample_fewshot(base, 4, 2, sampler="dassl", check_readable=False, draw_from=full)
    train, val = dassl_reference(split, 4, 2)
    base_ids = {s.id for s in base.splits["train"]} | {s.id for s in base.splits["val"]}
    assert fs.train == [i for i in train if i in base_ids] and fs.val == [i for i in val if i in base_ids]
    assert {int(i[1]) for i in fs.train} == set(range(4))  # c0..c3: the first ceil(7/2) labels


def test_dassl_draws_are_persisted_apart(tmp_path):
    ds = dataset_of(synthetic_split(2))
    a = persist_fewshot(sample_fewshot(ds, 2, 1, sampler="dassl", check_readable=False), tmp_path)
    b = persist_fewshot(sample_fewshot(ds, 2, 1, check_readable=False), tmp_path)
    assert a != b and "dassl" in a.name and json.loads(a.read_text())["source"] == "dassl"


# ----------------------------------------------------------------------------- CoOp's pickles
@pytest.fixture
def fake_dassl(monkeypatch):
    """A module named like Dassl's, holding a Datum shaped like Dassl's (so pickle records that name)."""
    mod = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__ = mod.__name__
    Datum.__qualname__ = "Datum"
    mod.Datum = Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return Datum


def coop_pickle(path, datum_cls, split, shots, seed, root="/home/someone/data/synthetic/images", val=True):
    train, val_ids = dassl_reference(split, shots, seed)
    label = {r[0]: r[1] for k in ("train", "val") for r in split[k]}
    rec = {"train": [datum_cls(f"{root}/{i}", label[i], 0, f"class_{label[i]}") for i in train]}
    if val:
        rec["val"] = [datum_cls(f"{root}/{i}", label[i], 0, f"class_{label[i]}") for i in val_ids]
    path.write_bytes(pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL))
    return train, val_ids


def test_import_reads_coop_pickle(tmp_path, fake_dassl, monkeypatch):
    split = synthetic_split(3)
    path = tmp_path / "shot_4-seed_2.pkl"
    train, val = coop_pickle(path, fake_dassl, split, 4, 2)
    for name in ("dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"):
        monkeypatch.delitem(sys.modules, name)  # the reader must not need Dassl
    fs = import_fewshot(path, dataset_of(split), 4, 2)
    assert fs.train == train and fs.val == val and fs.source.startswith("import:")


def test_import_maps_windows_paths_and_checks_labels(tmp_path, fake_dassl):
    split = synthetic_split(4)
    path = tmp_path / "shot_2-seed_1.pkl"
    train, _ = coop_pickle(path, fake_dassl, split, 2, 1, root="C:\\data\\synthetic\\images", val=False)
    fs = import_fewshot(path, dataset_of(split), 2, 1)
    assert fs.train == [i.replace("\\", "/") for i in train] and fs.val == []
    # a record whose label disagrees with the dataset is refused with the figures
    wrong = [fake_dassl(f"/x/{train[0]}", 99, 0, "other")]
    path.write_bytes(pickle.dumps({"train": wrong}, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(DatasetError, match="another label"):
        import_fewshot(path, dataset_of(split), 2, 1)
    missing = [fake_dassl("/x/nowhere/else.jpg", 0, 0, "class_0")]
    path.write_bytes(pickle.dumps({"train": missing}, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(DatasetError, match="not in this dataset"):
        import_fewshot(path, dataset_of(split), 2, 1)


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_import_refuses_a_crafted_pickle(tmp_path):
    sentinel = tmp_path / "owned"
    path = tmp_path / "shot_1-seed_1.pkl"
    path.write_bytes(pickle.dumps({"train": [_Evil(f"touch {sentinel}")]}))
    with pytest.raises(DatasetError, match="refused to load global"):
        load_coop_pickle(path)
    assert not sentinel.exists()
    # a Datum-named global is admitted, but its state is checked: no other attributes, no other types
    payload = (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c dassl.data.datasets.base_dataset\x94\x8c\x05Datum"
               b"\x94\x93\x94)\x81\x94}\x94\x8c\x07_impath\x94K\x01sb.")
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match="_impath is a int"):
        load_coop_pickle(path)
    # builtins other than plain data constructors are refused (getattr would reach anything)
    path.write_bytes(b"\x80\x04cbuiltins\ngetattr\n(cos\nsystem\nX\x02\x00\x00\x00idtR.")
    with pytest.raises(DatasetError, match="refused to load global 'builtins.getattr'"):
        load_coop_pickle(path)
