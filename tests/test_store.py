"""Key-value stores on disk and the cache builder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caches.builder import VIEW_SEED, CacheBuilder
from caches.data.augment import AugmentSpec, augmented_view, eval_transform, view_generator
from caches.data.datasets import load_digits, load_folder
from caches.data.fewshot import sample_fewshot, select
import caches.store as store_module
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
    with pytest.raises(StoreError, match="edited"):
        KVStore.load(tmp_path / "t")
    # an edit that also recomputes the manifest's digest still breaks the fingerprint
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    m["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="does not match its spec"):
        KVStore.load(tmp_path / "t")


def test_interrupted_write_leaves_no_valid_store(tmp_path, monkeypatch):
    keys, values, views = _arrays()
    real_write = store_module._write_blocks
    calls = {"n": 0}

    def dying_write(path, blocks):
        calls["n"] += 1
        if calls["n"] == 4:  # keys, values and meta written, views not yet
            raise KeyboardInterrupt("killed")
        return real_write(path, blocks)

    monkeypatch.setattr(store_module, "_write_blocks", dying_write)
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
    x = augmented_view(img, tiny.image_spec, AugmentSpec(), view_generator(VIEW_SEED, 2, samples[5].id))
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


def test_images_shared_by_runs_are_encoded_once(tmp_path, tiny):
    """Other seeds and shot counts only encode the images no earlier run drew; the stores stay exact."""
    ds = load_digits(T)
    b = CacheBuilder(tiny, tmp_path, progress=False)
    seen_train: set[str] = set()
    seen_val: set[str] = set()
    for shots, seed in ((2, 1), (4, 1), (2, 2), (4, 2)):
        fs = sample_fewshot(ds, shots, seed=seed)
        before = b.encoded_images
        store = b.support(ds, select(ds, "train", fs.train), shots, seed, views=2)
        b.features(ds, "val", select(ds, "val", fs.val))
        new = (set(fs.train) - seen_train, set(fs.val) - seen_val)
        assert b.encoded_images - before == 2 * len(new[0]) + len(new[1])
        seen_train |= set(fs.train)
        seen_val |= set(fs.val)
        # the assembled store equals encoding its images here
        samples = select(ds, "train", fs.train)
        x = torch.stack([augmented_view(ds.load_image(s), tiny.image_spec, AugmentSpec(),
                                        view_generator(VIEW_SEED, 1, s.id)) for s in samples])
        torch.testing.assert_close(store.view_features()[1], tiny.encode_images(x), rtol=1e-4, atol=1e-5)
    assert b.encoded_images == 2 * len(seen_train) + len(seen_val)


def test_a_changed_image_is_encoded_again(tmp_path, tiny, class_folder):
    ds = load_folder(str(class_folder), T)
    samples = ds.splits["test"][:4]
    b = CacheBuilder(tiny, tmp_path / "cache", progress=False)
    first = b.features(ds, "test", samples).keys()
    target = Path(samples[0].path)
    Image.new("RGB", (24, 24), (255, 255, 255)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    encoded = b.encoded_images
    second = b.features(ds, "test", samples).keys()
    assert b.encoded_images == encoded + 1  # only the changed image
    assert not torch.allclose(first[0], second[0]) and torch.equal(first[1:], second[1:])


_BUILD = """
import sys, time
from caches.backbone import FrozenClip
from caches.builder import CacheBuilder
from caches.data.datasets import load_digits
from caches.data.fewshot import sample_fewshot, select
ds = load_digits({T})
fs = sample_fewshot(ds, 4, seed=1)
b = CacheBuilder(FrozenClip("fewclip-tiny", None, device="cpu"), sys.argv[1], batch_size=8, progress=False)
orig = b.encode_pixels
b.encode_pixels = lambda px: (time.sleep(0.05), orig(px))[1]  # slow enough for the jobs to overlap
b.support(ds, select(ds, "train", fs.train), 4, 1, views=2)
print(b.encoded_images)
"""


def test_concurrent_jobs_build_a_store_once(tmp_path):
    """Two processes asking for the same store at once: one builds it, the other waits and loads it."""
    script = tmp_path / "build.py"
    script.write_text(_BUILD.replace("{T}", repr(T)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache")], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    counts = sorted(int(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert counts == [0, 4 * 10 * 2]  # 4 shots x 10 classes x 2 views, encoded by one job only
    stores = list((tmp_path / "cache").glob("*/*/support-*"))
    assert len(stores) == 1 and not list((tmp_path / "cache").glob("*/*/.support-*.tmp-*"))


def test_builder_rebuilds_a_corrupt_store(tmp_path, tiny):
    ds = load_digits(T)
    samples = ds.splits["val"][:10]
    b = CacheBuilder(tiny, tmp_path, progress=False)
    s = b.features(ds, "val", samples)
    (Path(s.path) / "keys.faiss").write_bytes(b"garbage")
    b2 = CacheBuilder(tiny, tmp_path, progress=False)
    s2 = b2.features(ds, "val", samples)
    # rebuilt from the feature bank: nothing to encode again
    assert b2.built == [Path(s.path).name] and b2.encoded_images == 0 and torch.equal(s2.keys(), s.keys())
    # a damaged bank chunk is ignored, and its images encoded again
    (Path(s2.path) / "keys.faiss").write_bytes(b"garbage")
    for chunk in Path(tmp_path).glob("*/*/bank-eval-*/chunk-*"):
        (chunk / "keys.faiss").write_bytes(b"garbage")
    b3 = CacheBuilder(tiny, tmp_path, progress=False)
    s3 = b3.features(ds, "val", samples)
    assert b3.encoded_images == 10 and torch.equal(s3.keys(), s.keys())


def test_unreadable_test_images_are_skipped_and_counted(tmp_path, tiny, class_folder):
    ds = load_folder(str(class_folder), T, fractions=[0.6, 0.2, 0.2])
    bad = ds.splits["test"][1]
    Path(bad.path).write_bytes(b"\x89PNG broken")
    store = CacheBuilder(tiny, tmp_path / "c", progress=False).features(ds, "test", ds.splits["test"])
    assert store.manifest["skipped"] == [bad.id]
    assert len(store) == len(ds.splits["test"]) - 1
    assert bad.id not in [r["id"] for r in store.meta]
