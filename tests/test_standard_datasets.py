"""The benchmark dataset configs on generated mini-copies of their layouts, end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from layouts import COOP, WNID_NAMES, make_all, make_coop, make_csv, make_fashion, make_imagenet, make_imagenet_targets

from caches.data.check import check_dataset
from caches.data.records import DatasetError, base_class_count, subsample_classes
from caches.data.standard import imagenet_target
from caches.store import KVStore
from fewclip.config import compose, group_options
from fewclip.runner import instantiate_node as instantiate
from fewclip.runner import run

STANDARD = COOP + ["fgvc_aircraft", "imagenet", "imagenet_ens", "fashion_mnist", "csv"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, make_all(root)


def test_every_standard_dataset_has_a_config():
    assert set(STANDARD) | {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"} <= set(
        group_options("dataset"))


@pytest.mark.parametrize("name", STANDARD)
def test_dataset_loads_its_layout(name, data_root):
    root, extra = data_root
    cfg = compose([f"dataset={name}", f"data_root={root}", *extra[name]])
    ds = instantiate(cfg.dataset)
    n = {s: len(v) for s, v in ds.splits.items()}
    assert min(n.values()) > 0 and ds.n_classes >= 3
    if name in COOP + ["fgvc_aircraft"]:
        assert n == {"train": 24, "val": 12, "test": 12} and ds.source["split_source"] == "standard"
    if name in COOP:
        assert ds.classnames == ["class 0", "class 1", "class 2", "class 3"]  # `_` -> space
    if name.startswith("imagenet"):
        assert ds.classnames == WNID_NAMES and n["test"] == 18
        assert n["val"] == 6 * 8 and n["train"] == 6 * 8  # half of 16 per class held out (cap: len // 2)
        assert not {s.id for s in ds.splits["val"]} & {s.id for s in ds.splits["train"]}
        assert all(s.id.startswith("val/") for s in ds.splits["test"])
    if name == "imagenet_ens":
        assert len(ds.templates) == 7
    for split in ds.splits.values():  # every listed image exists and opens
        for s in split[:3]:
            assert ds.load_image(s).mode == "RGB"


@pytest.mark.parametrize("name", STANDARD)
def test_dataset_runs_zero_shot_and_tip(name, data_root, tmp_path):
    root, extra = data_root
    for adapter in ("zero_shot", "tip"):
        cfg = compose([f"dataset={name}", f"data_root={root}", *extra[name], f"adapter={adapter}", "shots=2",
                       "views=1", f"cache_dir={tmp_path / 'c'}", "progress=false", "device=cpu",
                       "adapter.beta_steps=4", "adapter.alpha_steps=4"] if adapter == "tip" else
                      [f"dataset={name}", f"data_root={root}", *extra[name], "shots=2", "views=1",
                       f"cache_dir={tmp_path / 'c'}", "progress=false", "device=cpu"])
        res = run(cfg, out_dir=tmp_path / adapter)
        assert res["adapter"] == adapter and res["n_support"] == 2 * res["n_classes"]
        assert 0 <= res["test_acc"] <= 100


def test_missing_split_file_generates_a_saved_non_standard_split(tmp_path):
    base = make_coop(tmp_path, "dtd", n_classes=3, per_split=(4, 2, 4), write_split=False)
    cfg = compose(["dataset=dtd", f"data_root={tmp_path}"])
    ds = instantiate(cfg.dataset)
    saved = base / "split_fewclip_DescribableTextures.json"
    assert saved.is_file() and not (base / "split_zhou_DescribableTextures.json").exists()
    data = json.loads(saved.read_text())
    assert set(data) == {"train", "val", "test"} and all(len(r) == 3 for r in data["train"])
    assert sum(len(v) for v in data.values()) == 30
    assert ds.source["split_source"] == "generated"
    again = instantiate(cfg.dataset)  # the saved split is reused, not redrawn
    assert [s.id for s in again.splits["train"]] == [s.id for s in ds.splits["train"]]
    res = run(compose(["dataset=dtd", f"data_root={tmp_path}", "shots=1", "views=1", "progress=false",
                       f"cache_dir={tmp_path / 'c'}"]), out_dir=tmp_path / "o")
    assert res["protocol"]["split_source"] == "generated"


def test_eurosat_generated_split_uses_coop_class_names(tmp_path):
    cfg = compose(["dataset=eurosat", f"data_root={tmp_path}"])
    images = tmp_path / "eurosat" / "2750"
    from layouts import _image

    rng = np.random.default_rng(0)
    for c, folder in enumerate(["AnnualCrop", "SeaLake"]):
        for i in range(5):
            _image(images / folder / f"{folder}_{i}.jpg", c, rng)
    ds = instantiate(cfg.dataset)
    assert ds.classnames == ["Annual Crop Land", "Sea or Lake"]


def test_missing_data_gives_the_expected_layout(tmp_path):
    for name in ("oxford_pets", "fgvc_aircraft", "imagenet", "imagenet_a"):
        with pytest.raises(DatasetError, match="Expected layout"):
            instantiate(compose([f"dataset={name}", f"data_root={tmp_path}"]).dataset)
    make_coop(tmp_path, "oxford_pets", write_split=False)
    # pets keeps its images in one folder: without the split file there is nothing to split by
    import shutil

    base = tmp_path / "oxford_pets" / "images"
    for f in list(base.rglob("*.jpg")):
        shutil.move(f, base / f"{f.parent.name}_{f.name}")
    with pytest.raises(DatasetError, match="needs its split file"):
        instantiate(compose(["dataset=oxford_pets", f"data_root={tmp_path}"]).dataset)


def test_corrupt_split_file_and_wrong_class_labels(tmp_path):
    base = make_coop(tmp_path, "dtd")
    (base / "split_zhou_DescribableTextures.json").write_text('{"train": [["a.jpg"]]}')
    with pytest.raises(DatasetError, match="is not a split file"):
        instantiate(compose(["dataset=dtd", f"data_root={tmp_path}"]).dataset)
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps(
        {"train": [["class_0/train_0.jpg", 0, "a"], ["class_1/train_0.jpg", 2, "b"]], "val": [], "test": []}))
    with pytest.raises(DatasetError, match="not 0..C-1"):
        instantiate(compose(["dataset=dtd", f"data_root={tmp_path}"]).dataset)


def test_base_to_novel_subsampling():
    ds = instantiate(compose(["dataset=digits"]).dataset)
    n = ds.n_classes
    base = subsample_classes(instantiate(compose(["dataset=digits"]).dataset), "base")
    new = instantiate(compose(["dataset=digits", "dataset.subsample=new"]).dataset)
    assert base_class_count(7) == 4 and base_class_count(10) == 5
    assert base.classnames == ds.classnames[: math.ceil(n / 2)] and new.classnames == ds.classnames[5:]
    assert {s.label for s in new.splits["test"]} == set(range(5))  # relabelled from 0
    old = {s.id: s.label for s in ds.splits["test"]}
    assert all(old[s.id] == s.label + 5 for s in new.splits["test"])
    with pytest.raises(DatasetError, match="subsample"):
        subsample_classes(ds, "novel")


def test_imagenet_targets_map_to_imagenet_labels(tmp_path):
    make_imagenet(tmp_path)
    make_imagenet_targets(tmp_path, subset=(1, 3, 4))
    a = imagenet_target(str(tmp_path), ["{}"], "imagenet_a", "imagenet-adversarial", "imagenet-a")
    assert a.parent_labels == [1, 3, 4] and a.classnames == [WNID_NAMES[i] for i in (1, 3, 4)]
    assert a.splits["train"] == [] and len(a.splits["test"]) == 9
    cfg = compose(["dataset=imagenet", f"data_root={tmp_path}", "adapter=zero_shot", "shots=2", "views=1",
                   "targets=[imagenet_v2,imagenet_sketch,imagenet_a,imagenet_r]", "progress=false",
                   f"cache_dir={tmp_path / 'c'}"])
    res = run(cfg, out_dir=tmp_path / "o")
    assert set(res["targets"]) == {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    # Independent check for ImageNet-A: zero-shot over the 3 mapped ImageNet classes only.
    text = KVStore.load(res["cache"]["text"]["path"]).keys()
    tgt = KVStore.load(res["targets"]["imagenet_a"]["cache"]["path"])
    logits = tgt.keys() @ text[[1, 3, 4]].t()
    expected = float((logits.argmax(1) == tgt.labels()).float().mean()) * 100
    assert res["targets"]["imagenet_a"]["test_acc"] == pytest.approx(expected)
    assert res["targets"]["imagenet_a"]["n_test"] == 9
    with pytest.raises(DatasetError, match="evaluation-only"):
        run(compose(["dataset=imagenet_a", f"data_root={tmp_path}", f"cache_dir={tmp_path / 'c'}"]),
            out_dir=tmp_path / "x")


def test_fashion_mnist_reads_idx_files(tmp_path):
    root = make_fashion(tmp_path / "f")
    ds = instantiate(compose(["dataset=fashion_mnist", f"dataset.root={root}"]).dataset)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 100, "val": 20, "test": 30}
    s = ds.splits["test"][7]
    assert s.label == 7 and ds.load_image(s).size == (28, 28)
    # pixel values come from the file: the class-7 image is brighter than the class-0 one
    a0 = float(np.asarray(ds.load_image(ds.splits["test"][0])).mean())
    a7 = float(np.asarray(ds.load_image(s)).mean())
    assert a7 > a0 + 50
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        instantiate(compose(["dataset=fashion_mnist", f"dataset.root={root}"]).dataset)


def test_csv_dataset_with_and_without_split(tmp_path):
    with_split = make_csv(tmp_path / "a", with_split=True)
    ds = instantiate(compose(["dataset=csv", f"dataset.path={with_split}"]).dataset)
    assert ds.classnames == ["kind 0", "kind 1", "kind 2"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 12, "val": 6, "test": 6}
    no_split = make_csv(tmp_path / "b", with_split=False)
    ds = instantiate(compose(["dataset=csv", f"dataset.path={no_split}"]).dataset)
    assert sum(len(v) for v in ds.splits.values()) == 24 and ds.source["split_source"] == "generated"
    (tmp_path / "bad.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(DatasetError, match="needs path and label"):
        instantiate(compose(["dataset=csv", f"dataset.path={tmp_path / 'bad.csv'}"]).dataset)


def test_data_check_reports_real_problems(tmp_path):
    base = make_coop(tmp_path, "dtd")
    ds = instantiate(compose(["dataset=dtd", f"data_root={tmp_path}"]).dataset)
    assert check_dataset(ds, progress=False).problems == []
    (base / "images" / "class_1" / "train_2.jpg").write_bytes(b"garbage")
    (base / "images" / "class_2" / "test_0.jpg").unlink()
    report = check_dataset(ds, progress=False)
    assert report.missing == ["class_2/test_0.jpg"] and report.unreadable == ["class_1/train_2.jpg"]
    assert report.counts == {"train": 24, "val": 12, "test": 12}
    assert report.per_class["test"]["class 2"] == 3


@pytest.mark.slow
def test_data_check_cli(tmp_path):
    base = make_coop(tmp_path, "dtd")
    (base / "images" / "class_1" / "val_0.jpg").write_bytes(b"garbage")
    cmd = [sys.executable, "-m", "fewclip", "data", "check", "dataset=dtd", f"data_root={tmp_path}",
           "progress=false"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "1 unreadable" in p.stdout and "class_1/val_0.jpg" in p.stdout
    p = subprocess.run(cmd[:-2] + [f"data_root={tmp_path / 'none'}", "progress=false"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "Expected layout" in p.stdout and "split_zhou_DescribableTextures.json" in p.stdout


def test_class_lists_that_do_not_match_the_folders(tmp_path):
    base = make_imagenet(tmp_path)
    lines = (base / "classnames.txt").read_text().splitlines()
    (base / "classnames.txt").write_text("\n".join(lines[:-1]) + "\n")  # one class fewer than folders
    with pytest.raises(DatasetError, match="not listed in classnames.txt"):
        instantiate(compose(["dataset=imagenet", f"data_root={tmp_path}"]).dataset)
    make_imagenet_targets(tmp_path)
    (tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "7").mkdir()
    with pytest.raises(DatasetError, match="outside 0..5"):
        instantiate(compose(["dataset=imagenet_v2", f"data_root={tmp_path}"]).dataset)


def test_missing_and_corrupt_images_during_a_run(tmp_path):
    base = make_coop(tmp_path, "dtd")
    (base / "images" / "class_0" / "test_1.jpg").unlink()
    (base / "images" / "class_3" / "test_2.jpg").write_bytes(b"broken")
    res = run(compose(["dataset=dtd", f"data_root={tmp_path}", "shots=2", "views=1", "progress=false",
                       f"cache_dir={tmp_path / 'c'}"]), out_dir=tmp_path / "o")
    assert res["n_test"] == 10 and res["n_test_skipped"] == 2
