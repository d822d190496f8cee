"""Key-value stores on disk and the cache builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caches.builder import CacheBuilder
from caches.data.augment import AugmentSpec, augmented_view, eval_transform, view_generator
from caches.data.datasets import load_digits, load_folder
from caches.data.fewshot import sample_fewshot, select
from caches.store import KVStore, StoreError, fingerprint

T = ["a photo of a {}."]


def _arrays(n=12, d=8, a=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = F.normalize(torch.randn(a, n, d, generator=g), dim=-1)
    keys = F.normalize(views.mean(0), dim=-1)
    return keys, torch.arange(n) % 4, views


def test_round_trip(tmp_path):
    keys, values, views = _arrays()
    spec = {"kind": "test", "x": 1}
    meta = [{"id": f"s{i}", "label": int(v)} for i, v in enumerate(values)]
    store = KVStore.write(tmp_path / "s", spec, keys, values, views=views, meta=meta)
    again = KVStore.load(tmp_path / "s", fingerprint(spec))
    assert torch.equal(again.keys(), keys) and torch.equal(again.labels(), values)
    assert again.labels().dtype == torch.int64
    assert torch.equal(again.view_features(), views)
    assert [r["id"] for r in again.meta] == [m["id"] for m in meta]
    assert again.manifest["n"] == 12 and again.manifest["dim"] == 8 and store.fingerprint == fingerprint(spec)
    # the faiss index answers inner-product queries
    scores, ids = again.search(keys[:3], k=1)
    assert ids[:, 0].tolist() == [0, 1, 2]
    torch.testing.assert_close(scores[:, 0], torch.ones(3))
    # no pickles: every array loads with allow_pickle=False
    np.load(tmp_path / "s" / "values.npy", allow_pickle=False)


def test_fingerprint_mismatch_is_refused(tmp_path):
    keys, values, _ = _arrays()
    KVStore.write(tmp_path / "s", {"kind": "a"}, keys, values)
    with pytest.raises(StoreError, match="expected"):
        KVStore.load(tmp_path / "s", fingerprint({"kind": "b"}))


def test_tampering_is_detected(tmp_path):
    keys, values, _ = _arrays()
    KVStore.write(tmp_path / "s", {"kind": "a"}, keys, values)
    np.save(tmp_path / "s" / "values.npy", values.numpy()[::-1].copy())
    with pytest.raises(StoreError, match="checksum"):
        KVStore.load(tmp_path / "s")
    KVStore.write(tmp_path / "t", {"kind": "a"}, keys, values)
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    m["spec"]["kind"] = "edited"
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="does not match its spec"):
        KVStore.load(tmp_path / "t")


def test_interrupted_write_leaves_no_valid_store(tmp_path, monkeypatch):
    keys, values, views = _arrays()
    real_save = np.save
    calls = {"n": 0}

    def dying_save(path, arr, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # values written, views not yet
            raise KeyboardInterrupt("killed")
        return real_save(path, arr, **kw)

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        KVStore.write(tmp_path / "s", {"kind": "a"}, keys, values, views=views)
    assert not (tmp_path / "s").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too
    # and a directory left without manifest (e.g. power cut) is not a store
    (tmp_path / "s").mkdir()
    with pytest.raises(StoreError, match="no manifest"):
        KVStore.load(tmp_path / "s")


def test_augmented_views_are_seeded_and_differ():
    ds = load_digits(T)
    img = ds.load_image(ds.splits["train"][0])
    from caches.backbone import ImageSpec

    spec = ImageSpec(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    aug = AugmentSpec()
    a = augmented_view(img, spec, aug, view_generator(1, 0, "x"))
    b = augmented_view(img, spec, aug, view_generator(1, 0, "x"))
    c = augmented_view(img, spec, aug, view_generator(1, 1, "x"))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    e = eval_transform(spec)(img)
    assert e.shape == (3, 32, 32)


def test_builder_encodes_once_and_keys_are_view_means(tmp_path, tiny):
    ds = load_digits(T)
    fs = sample_fewshot(ds, 2, seed=1)
    samples = select(ds, "train", fs.train)
    b1 = CacheBuilder(tiny, tmp_path, progress=False)
    s1 = b1.support(ds, samples, 2, 1, views=3)
    v1 = b1.features(ds, "val", select(ds, "val", fs.val))
    t1 = b1.text(ds)
    assert b1.encoded_images == len(samples) * 3 + len(fs.val)
    views = s1.view_features()
    assert views.shape == (3, 20, tiny.dim)
    torch.testing.assert_close(s1.keys(), F.normalize(views.mean(0), dim=-1))
    assert s1.labels().tolist() == [s.label for s in samples]
    # each view equals encoding that augmented image directly
    img = ds.load_image(samples[5])
    x = augmented_view(img, tiny.image_spec, AugmentSpec(), view_generator(1, 2, samples[5].id))
    torch.testing.assert_close(views[2, 5], tiny.encode_images(x[None])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t1.keys(), tiny.text_head(ds.classnames, ds.templates))

    b2 = CacheBuilder(tiny, tmp_path, progress=False)
    s2 = b2.support(ds, samples, 2, 1, views=3)
    v2 = b2.features(ds, "val", select(ds, "val", fs.val))
    b2.text(ds)
    assert b2.encoded_images == 0 and b2.built == []
    assert s2.path == s1.path and v2.fingerprint == v1.fingerprint
    # any change to what produced a store gives another store
    s3 = b2.support(ds, samples, 2, 1, views=2)
    assert s3.path != s1.path and b2.encoded_images == len(samples) * 2


def test_builder_rebuilds_a_corrupt_store(tmp_path, tiny):
    ds = load_digits(T)
    samples = ds.splits["val"][:10]
    b = CacheBuilder(tiny, tmp_path, progress=False)
    s = b.features(ds, "val", samples)
    (Path(s.path) / "keys.faiss").write_bytes(b"garbage")
    b2 = CacheBuilder(tiny, tmp_path, progress=False)
    s2 = b2.features(ds, "val", samples)
    assert b2.encoded_images == 10 and torch.equal(s2.keys(), s.keys())


def test_unreadable_test_images_are_skipped_and_counted(tmp_path, tiny, class_folder):
    ds = load_folder(str(class_folder), T, fractions=[0.6, 0.2, 0.2])
    bad = ds.splits["test"][1]
    Path(bad.path).write_bytes(b"\x89PNG broken")
    store = CacheBuilder(tiny, tmp_path / "c", progress=False).features(ds, "test", ds.splits["test"])
    assert store.manifest["skipped"] == [bad.id]
    assert len(store) == len(ds.splits["test"]) - 1
    assert bad.id not in [r["id"] for r in store.meta]
