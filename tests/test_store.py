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

import caches.store as store_module
from caches.builder import VIEW_SEED, CacheBuilder
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
    real_write = store_module.write_blocks
    calls = {"n": 0}

    def dying_write(path, blocks):
        calls["n"] += 1
        if calls["n"] == 4:  # keys, values and meta written, views not yet
            raise KeyboardInterrupt("killed")
        return real_write(path, blocks)

    monkeypatch.setattr(store_module, "write_blocks", dying_write)
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


# ---------------------------------------------------------------------------------------------- format 2
def _count_hashing(monkeypatch):
    import caches.storefiles as files

    calls: list[str] = []
    real = files.sha256_file

    def counting(path, *a):
        calls.append(Path(path).name)
        return real(path, *a)

    monkeypatch.setattr(files, "sha256_file", counting)
    return calls


def test_warm_loads_check_size_and_mtime_not_every_byte(tmp_path, monkeypatch):
    keys, values, views = _arrays()
    KVStore.write(tmp_path / "s", {"kind": "a"}, keys, values, views=views)
    hashed = _count_hashing(monkeypatch)
    assert torch.equal(KVStore.load(tmp_path / "s").view_features(), views)
    assert hashed == []  # size + mtime agree: no hashing
    # A copy without preserved times: each file is hashed once, accepted, and its recorded mtime put back.
    target = tmp_path / "s" / "views.npy"
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 5 * 10**9))
    assert torch.equal(KVStore.load(tmp_path / "s").view_features(), views)
    assert hashed == ["views.npy"]
    KVStore.load(tmp_path / "s")
    assert hashed == ["views.npy"]
    # Same size, content changed, mtime changed: hashed and refused.
    arr = np.load(target)
    arr[0, 0, 0] += 1.0
    np.save(target, arr)
    with pytest.raises(StoreError, match="checksum mismatch for views.npy"):
        KVStore.load(tmp_path / "s")
    # A change of size is refused without hashing, with the figures.
    hashed.clear()
    with open(tmp_path / "s" / "values.npy", "ab") as f:
        f.write(b"\0")
    with pytest.raises(StoreError, match=r"values.npy has \d+ bytes, the manifest says \d+"):
        KVStore.load(tmp_path / "s")
    assert "values.npy" not in hashed


def test_full_verification_finds_what_the_stat_check_cannot(tmp_path):
    """A flipped byte with size and mtime restored passes the cheap check; ``full`` and verify_tree catch it."""
    keys, values, views = _arrays()
    KVStore.write(tmp_path / "s", {"kind": "a"}, keys, values, views=views)
    target = tmp_path / "s" / "views.npy"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    KVStore.load(tmp_path / "s")  # documented limit of the default check
    with pytest.raises(StoreError, match="checksum mismatch for views.npy"):
        KVStore.load(tmp_path / "s", full=True)
    reports = store_module.verify_tree(tmp_path)
    assert [(r.path.name, r.status) for r in reports] == [("s", "bad")] and "views.npy" in reports[0].detail


def _edit_manifest(d: Path, edit, redigest: bool) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    if redigest:
        body = {k: v for k, v in m.items() if k != "manifest_sha256"}
        m["manifest_sha256"] = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("field,edit,redigest_message", [
    ("dim", lambda m: m.update(dim=m["dim"] + 1), "dimension"),
    ("n", lambda m: m.update(n=m["n"] - 1), "the manifest says"),
    ("views", lambda m: m.update(views=m["views"] + 1), "views are"),
    ("index", lambda m: m.update(index="IndexHNSWFlat"), "index type"),
    ("skipped", lambda m: m.update(skipped=[], skipped_at=[]), "skipped list"),
    ("skipped", lambda m: m.update(skipped=[m["skipped"][0], "digits/test/extra"],
                                   skipped_at=[m["skipped_at"][0], m["n"]]), "skipped list"),
    ("files", lambda m: m["files"].pop("meta.csv"), "lacks one of"),
])
def test_every_manifest_field_is_verified(tmp_path, field, edit, redigest_message):
    """Crafted manifests: any edit breaks the manifest digest; with the digest recomputed too, the field is
    still checked against the files (or, for ``skipped``, against the ids the store was built for)."""
    ids = [f"s{i}" for i in range(12)]
    keys, values, views = _arrays()
    kept = [i for i in range(12) if i != 5]
    spec = {"kind": "features", "ids": store_module.ids_digest(ids)}
    KVStore.write(tmp_path / "s", spec, keys[kept], values[kept], views=views[:, kept],
                  meta=[{"id": ids[i], "label": int(values[i])} for i in kept],
                  extra={"skipped": [ids[5]], "skipped_at": [5]})
    store = KVStore.load(tmp_path / "s")
    assert store.manifest["skipped"] == ["s5"] and len(store) == 11
    for redigest, message in ((False, "edited"), (True, redigest_message)):
        KVStore.write(tmp_path / "t", spec, keys[kept], values[kept], views=views[:, kept],
                      meta=[{"id": ids[i], "label": int(values[i])} for i in kept],
                      extra={"skipped": [ids[5]], "skipped_at": [5]})
        _edit_manifest(tmp_path / "t", edit, redigest)
        with pytest.raises(StoreError, match=message):
            KVStore.load(tmp_path / "t")
        import shutil

        shutil.rmtree(tmp_path / "t")


def test_edited_skipped_list_of_a_built_test_store_is_rebuilt(tmp_path, tiny, class_folder):
    """The reported issue: a test store whose ``skipped`` was edited must not be reused (n_test_skipped)."""
    ds = load_folder(str(class_folder), T, fractions=[0.6, 0.2, 0.2])
    bad = ds.splits["test"][1]
    Path(bad.path).write_bytes(b"\x89PNG broken")
    b = CacheBuilder(tiny, tmp_path / "c", progress=False)
    store = b.features(ds, "test", ds.splits["test"])
    _edit_manifest(store.path, lambda m: m.update(skipped=[], skipped_at=[]), redigest=True)
    b2 = CacheBuilder(tiny, tmp_path / "c", progress=False)
    again = b2.features(ds, "test", ds.splits["test"])
    assert b2.built == [store.path.name] and b2.encoded_images == 0  # rebuilt from the bank
    assert again.manifest["skipped"] == [bad.id]


def _legacy_store(d: Path, spec: dict, keys: torch.Tensor, values: torch.Tensor) -> None:
    """A store as format 1 wrote it: sha256 per file, no sizes, mtimes or manifest digest."""
    import faiss

    d.mkdir(parents=True)
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys.numpy())
    faiss.write_index(index, str(d / "keys.faiss"))
    np.save(d / "values.npy", values.numpy().astype(np.int64))
    (d / "meta.csv").write_text("row\n" + "".join(f"{i}\n" for i in range(len(values))))
    blob = json.dumps({"format_version": 1, **spec}, sort_keys=True, separators=(",", ":"))
    files = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in ("keys.faiss", "values.npy", "meta.csv")}
    (d / "manifest.json").write_text(json.dumps({
        "format_version": 1, "fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:20], "spec": spec,
        "n": len(values), "dim": keys.shape[1], "views": 0, "index": "IndexFlatIP", "files": files}))


def test_format_1_stores_are_read_with_full_hashing_and_never_reused_by_the_builder(tmp_path, tiny, caplog):
    keys, values, _ = _arrays()
    _legacy_store(tmp_path / "old", {"kind": "a"}, keys, values)
    assert torch.equal(KVStore.load(tmp_path / "old").keys(), keys)  # e.g. the stores inside older artifacts
    np.save(tmp_path / "old" / "values.npy", values.numpy()[::-1].copy())
    with pytest.raises(StoreError, match="checksum"):
        KVStore.load(tmp_path / "old")
    assert [r.status for r in store_module.verify_tree(tmp_path / "old")] == ["old"]
    # In a cache, a format-1 store of the same settings is named, not used, and the new one is built.
    ds = load_digits(T)
    b = CacheBuilder(tiny, tmp_path / "c", progress=False)
    head = tiny.text_head(ds.classnames, ds.templates)
    _legacy_store(tmp_path / "c" / "tiny" / "digits" / "text-0123456789abcdef0123", {"kind": "text"}, head,
                  torch.arange(len(ds.classnames)))
    with caplog.at_level("WARNING", logger="caches.builder"):
        store = b.text(ds)
    assert b.built == [store.path.name] and store.manifest["format_version"] == 2
    assert "text-0123456789abcdef0123 was written by an older fewclip (store format 1" in caplog.text


def test_cold_support_build_writes_each_view_once(tmp_path, tiny, monkeypatch):
    """The support store points at the bank's rows; a later store from the bank writes no views at all."""
    written: list[tuple[str, int]] = []
    real = store_module.write_blocks

    def recording(path, blocks):
        rec = real(path, blocks)
        written.append((Path(path).name, rec["size"]))
        return rec

    monkeypatch.setattr(store_module, "write_blocks", recording)
    ds = load_digits(T)
    fs = sample_fewshot(ds, 4, seed=1)
    samples = select(ds, "train", fs.train)
    b = CacheBuilder(tiny, tmp_path, progress=False)
    store = b.support(ds, samples, 4, 1, views=3)
    view_bytes = 3 * len(samples) * tiny.dim * 4
    views_written = [size for name, size in written if name == "views.npy"]
    assert len(views_written) == 1 and view_bytes < views_written[0] < view_bytes + 200  # .npy header
    assert not (store.path / "views.npy").exists() and store.references_bank
    direct = b.support(ds, samples, 4, 1, views=3)
    reloaded = KVStore.load(store.path, store.fingerprint).view_features()
    assert torch.equal(reloaded, store.view_features()) and torch.equal(reloaded, direct.view_features())
    # A 2-shot store drawn from the same images: assembled from the bank, nothing encoded or written as views.
    written.clear()
    half = [s for i, s in enumerate(samples) if i % 4 < 2]
    b2 = CacheBuilder(tiny, tmp_path, progress=False)
    small = b2.support(ds, half, 2, 9, views=3)
    assert b2.encoded_images == 0 and [n for n, _ in written if n == "views.npy"] == []
    rows = [i for i in range(len(samples)) if i % 4 < 2]
    assert torch.equal(small.view_features(), reloaded[:, rows])
    # The artifact / export path gets a self-contained copy with the same fingerprint.
    copy = small.copy_to(tmp_path / "elsewhere" / "support")
    assert (copy.path / "views.npy").is_file() and copy.fingerprint == small.fingerprint
    assert torch.equal(KVStore.load(copy.path, small.fingerprint).view_features(), small.view_features())


def test_a_store_reads_only_the_bank_chunks_it_needs(tmp_path, tiny, monkeypatch):
    ds = load_digits(T)
    train = ds.splits["train"]
    first, second = train[:20], train[20:40]
    b = CacheBuilder(tiny, tmp_path, progress=False)
    b.support(ds, first, 2, 1, views=2)
    b.support(ds, second, 2, 2, views=2)
    chunks = sorted((tmp_path / "tiny" / "digits").glob("bank-views-*/chunk-*"))
    assert len(chunks) == 2
    loaded: list[str] = []
    hashed = _count_hashing(monkeypatch)
    real_load = KVStore.load.__func__

    def recording_load(cls, path, *a, **kw):
        loaded.append(Path(path).name)
        return real_load(cls, path, *a, **kw)

    monkeypatch.setattr(KVStore, "load", classmethod(recording_load))
    opened: list[str] = []
    real_np_load = np.load

    def recording_np_load(file, *a, **kw):
        opened.append(str(file))
        return real_np_load(file, *a, **kw)

    monkeypatch.setattr(np, "load", recording_np_load)
    b2 = CacheBuilder(tiny, tmp_path, progress=False)
    store = b2.support(ds, second[:10], 1, 3, views=2)
    assert b2.encoded_images == 0 and hashed == []
    (owner,) = [c["name"] for c in store.manifest["bank_views"]["chunks"]]
    (other,) = [c for c in chunks if c.name != owner]
    assert owner in loaded and other.name not in loaded and not any(str(other) in p for p in opened)


def test_interrupted_build_resumes_from_completed_chunks(tmp_path, tiny):
    """A build killed part-way keeps its finished bank chunks: the rerun encodes only the rest."""
    ds = load_digits(T)
    samples = ds.splits["test"][:100]
    b = CacheBuilder(tiny, tmp_path, batch_size=10, progress=False, chunk_images=30)
    real = b.encode_pixels
    seen = {"n": 0}

    def dying(px):
        seen["n"] += px.shape[0]
        if seen["n"] > 42:  # killed at 42%: chunks of 30 images, so one chunk (30 images) is complete
            raise KeyboardInterrupt("killed")
        return real(px)

    b.encode_pixels = dying
    with pytest.raises(KeyboardInterrupt):
        b.features(ds, "test", samples)
    assert not list(tmp_path.glob("tiny/digits/features-*"))  # no store under the final name
    assert len(list(tmp_path.glob("tiny/digits/bank-eval-*/chunk-*"))) == 1
    # what a SIGKILL during a chunk write leaves (no finally clause runs): removed by the next build
    (leftover := next(tmp_path.glob("tiny/digits/bank-eval-*")) / ".chunk-x-y.tmp-abc").mkdir()
    (leftover / "views.npy").write_bytes(b"partial")
    b2 = CacheBuilder(tiny, tmp_path, batch_size=10, progress=False, chunk_images=30)
    store = b2.features(ds, "test", samples)
    assert b2.encoded_images == 100 - 30 and not leftover.exists()
    # and the assembled store equals a build from scratch
    fresh = CacheBuilder(tiny, tmp_path / "fresh", batch_size=10, progress=False).features(ds, "test", samples)
    torch.testing.assert_close(store.keys(), fresh.keys(), rtol=1e-5, atol=1e-6)


def test_a_support_store_whose_bank_chunk_is_gone_is_rebuilt(tmp_path, tiny):
    """The views live in the bank: a deleted or replaced chunk invalidates the store, which is rebuilt (encoding
    only what the bank lost) and never served with other views."""
    ds = load_digits(T)
    samples = ds.splits["train"][:20]
    b = CacheBuilder(tiny, tmp_path, batch_size=10, progress=False, chunk_images=20)  # 10 images x 2 views per chunk
    store = b.support(ds, samples, 2, 1, views=2)
    views = store.view_features()
    refs = store.manifest["bank_views"]["chunks"]
    assert len(refs) == 2
    # the store's own files damaged: rebuilt from the bank, nothing encoded
    (store.path / "view_rows.npy").write_bytes(b"garbage")
    b1 = CacheBuilder(tiny, tmp_path, batch_size=10, progress=False, chunk_images=20)
    assert torch.equal(b1.support(ds, samples, 2, 1, views=2).view_features(), views) and b1.encoded_images == 0
    assert b1.built == [store.path.name]
    import shutil

    bank = store.path.parent / store.manifest["bank_views"]["bank"]
    shutil.rmtree(bank / refs[1]["name"])
    with pytest.raises(StoreError, match=f"bank chunk {refs[1]['name']}, which is missing"):
        KVStore.load(store.path)
    b2 = CacheBuilder(tiny, tmp_path, batch_size=10, progress=False, chunk_images=20)
    again = b2.support(ds, samples, 2, 1, views=2)
    assert b2.built == [store.path.name] and b2.encoded_images == 10 * 2
    torch.testing.assert_close(again.view_features(), views, rtol=1e-5, atol=1e-6)
