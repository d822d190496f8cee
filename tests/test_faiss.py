"""faiss as the search engine: index types through the store, top-k cache lookups, k-NN, pools, GPU, packaging."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
import torch.nn.functional as F
from conftest import feature_task

from adapters.ape import APE
from adapters.base import AdapterContext, SupportSet
from adapters.knn import KNN
from adapters.tip import TipAdapter
from adapters.tip_f import TipAdapterF
from caches.pool import PoolChoice, PoolError, grow, load_pool, retrieve
from caches.search import IndexSpecError, KeyIndex, build_index, faiss_distributions, faiss_has_gpu
from caches.store import EXACT_KEYS, KVStore, StoreError, fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _keys(n: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1)


# ------------------------------------------------------------------------------------------ store round trips
@pytest.mark.parametrize("factory,cls,compressed", [
    ("Flat", "IndexFlatIP", False),
    ("HNSW16", "IndexHNSWFlat", False),
    ("IVF8,Flat", "IndexIVFFlat", False),
    ("IVF8,PQ4", "IndexIVFPQ", True),
])
def test_index_types_round_trip_through_the_store(tmp_path, factory, cls, compressed):
    keys, labels = _keys(600), torch.arange(600) % 7
    spec = {"kind": "support", "x": 1, **({} if factory == "Flat" else {"index": factory})}
    written = KVStore.write(tmp_path / "s", spec, keys, labels)
    store = KVStore.load(tmp_path / "s", fingerprint(spec))
    assert store.manifest["spec"].get("index", "Flat") == factory == store.index_factory
    assert store.manifest["index"] == cls and type(store.index).__name__ == cls
    # Keys come back exactly, whether the index stores them (Flat, HNSW, IVF-Flat) or compresses them (PQ).
    assert torch.equal(store.keys(), keys) and torch.equal(written.keys(), keys)
    assert ((store.path / EXACT_KEYS).is_file()) == compressed
    # Search finds each key itself first (exact inner product 1 with itself; PQ ranks by codes, so top-5).
    _, rows = store.searcher("nprobe=8" if "IVF" in factory else "").search(keys[:20], 5)
    assert all(i in r for i, r in enumerate(rows.tolist()))
    if factory != "Flat":  # the factory string is part of the fingerprint
        assert fingerprint(spec) != fingerprint({"kind": "support", "x": 1})


def test_a_store_whose_index_file_is_another_type_is_refused(tmp_path):
    keys = _keys(300)
    KVStore.write(tmp_path / "a", {"k": 1, "index": "HNSW16"}, keys, torch.zeros(300, dtype=torch.long))
    KVStore.write(tmp_path / "b", {"k": 1}, keys, torch.zeros(300, dtype=torch.long))
    (tmp_path / "a" / "keys.faiss").unlink()
    import shutil

    shutil.copy2(tmp_path / "b" / "keys.faiss", tmp_path / "a" / "keys.faiss")
    with pytest.raises(StoreError):
        KVStore.load(tmp_path / "a")


def test_too_few_keys_to_train_and_bad_strings_are_one_line_errors():
    with pytest.raises(IndexSpecError, match=r"IVF4096,Flat must be trained on at least 4096 keys and this store has "
                                             r"2000: use fewer lists \(IVF51"):
        build_index(_keys(2000).numpy(), "IVF4096,Flat")
    with pytest.raises(IndexSpecError, match="not a faiss index factory string"):
        build_index(_keys(10).numpy(), "NotAnIndex7")
    with pytest.raises(IndexSpecError, match="at least 256 keys"):
        build_index(_keys(100).numpy(), "PQ4")


def test_the_builder_puts_the_index_in_the_support_spec_only_when_not_flat(tmp_path, tiny):
    from caches.builder import CacheBuilder
    from caches.data.datasets import load_digits

    ds = load_digits(['a photo of the number: "{}".'])
    samples = [s for s in ds.splits["train"] if s.label < 2][:40]
    b = CacheBuilder(tiny, tmp_path, progress=False)
    flat = b.support(ds, samples, shots=20, seed=1, views=1)
    hnsw = b.support(ds, samples, shots=20, seed=1, views=1, index="HNSW8")
    assert "index" not in flat.manifest["spec"] and hnsw.manifest["spec"]["index"] == "HNSW8"
    assert flat.fingerprint != hnsw.fingerprint and torch.equal(flat.keys(), hnsw.keys())
    assert b.encoded_images == 40  # the second store came from the bank
    with pytest.raises(IndexSpecError):
        b.support(ds, samples, shots=20, seed=1, views=1, index="IVF64,Flat")


# ------------------------------------------------------------------------------------------ top-k lookups
def _ctx(support: SupportSet, text: torch.Tensor) -> AdapterContext:
    return AdapterContext(classnames=[f"c{i}" for i in range(text.shape[0])], text_head=text, support=support)


def test_topk_tip_with_k_equal_to_n_is_dense_tip():
    support, text, val, test = feature_task(6, 24)
    dense = TipAdapter(alpha=1.7, beta=3.0, search=False, lookup="dense")
    topk = TipAdapter(alpha=1.7, beta=3.0, search=False, lookup="topk", topk=len(support))
    for a in (dense, topk):
        a.setup(_ctx(support, text))
    # The dense formula written out here: 100 f W^T + alpha exp(-beta (1 - f K^T)) one_hot(L).
    expected = 100 * test.features @ text.t() + 1.7 * torch.exp(-3.0 * (1 - test.features @ support.keys.t())) \
        @ F.one_hot(support.labels, 6).float()
    got = topk(test.features)
    assert topk.k == len(support) and topk.lookup_record()["mode"] == "topk"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, dense(test.features), rtol=1e-5, atol=1e-4)
    assert torch.equal(got.argmax(1), dense(test.features).argmax(1))


def test_topk_search_with_k_equal_to_n_finds_the_dense_choice():
    support, text, val, _ = feature_task(5, 16)
    kw = {"beta_steps": 15, "alpha_steps": 8}
    dense, topk = TipAdapter(lookup="dense", **kw), TipAdapter(lookup="topk", topk=[len(support)], **kw)
    for a in (dense, topk):
        a.setup(_ctx(support, text))
    d, t = dense.tune(val), topk.tune(val)
    assert d["val_acc"] == t["val_acc"] and (dense.beta, dense.alpha) == (topk.beta, topk.alpha)


def test_topk_tip_keeps_only_each_querys_k_nearest_keys():
    support, text, _, test = feature_task(4, 16)
    tip = TipAdapter(alpha=2.0, beta=1.0, search=False, lookup="topk", topk=3)
    tip.setup(_ctx(support, text))
    sims = test.features @ support.keys.t()
    top = sims.topk(3, dim=1)
    cache = torch.zeros(len(test), 4).scatter_add_(1, support.labels[top.indices], torch.exp(-(1 - top.values)))
    torch.testing.assert_close(tip(test.features), 100 * test.features @ text.t() + 2.0 * cache)


def test_auto_lookup_switches_by_size_and_uses_the_stores_approximate_index(tmp_path):
    support, text, val, test = feature_task(6, 32)
    store = KVStore.write(tmp_path / "s", {"index": "HNSW16"}, support.keys, support.labels)
    indexed = SupportSet(support.keys, support.labels, support.views, index=store.searcher())
    small = TipAdapter(dense_max_keys=len(support), beta_steps=5, alpha_steps=5)
    large = TipAdapter(dense_max_keys=len(support) - 1, topk=[8, 16], beta_steps=5, alpha_steps=5)
    for a in (small, large):
        a.setup(_ctx(indexed, text))
        a.tune(val)
    assert small.lookup_record()["mode"] == "dense" and "k" not in small.hparams()
    rec = large.lookup_record()
    assert rec["mode"] == "topk" and rec["index"] == "HNSW16" and rec["class"] == "IndexHNSWFlat"
    assert rec["search_params"].startswith("efSearch=") and large.hparams()["k"] in (8, 16)
    assert large.key_lookup.index_for(large.keys) is indexed.index  # the store's own index, not a rebuilt one


def test_tip_f_trains_densely_then_searches_its_trained_keys():
    support, text, val, test = feature_task(4, 16)
    tip_f = TipAdapterF(lookup="topk", topk=[len(support)], epochs=2, beta_steps=4, alpha_steps=4)
    tip_f.setup(_ctx(support, text))
    tip_f.fit(support, val)
    tip_f.tune(val)
    trained = tip_f.keys.detach()
    assert not torch.equal(trained, support.keys)  # training moved the keys
    # k = N over the trained keys is the dense formula over them.
    expected = 100 * test.features @ text.t() + tip_f.alpha * torch.exp(
        -tip_f.beta * (1 - test.features @ trained.t())) @ F.one_hot(support.labels, 4).float()
    torch.testing.assert_close(tip_f.predict(test.features), expected, rtol=1e-5, atol=1e-4)


def test_topk_ape_with_k_equal_to_n_is_dense_ape():
    support, text, val, test = feature_task(5, 24)
    dense = APE(search=False, lookup="dense")
    topk = APE(search=False, lookup="topk", topk=len(support))
    for a in (dense, topk):
        a.setup(_ctx(support, text))
    torch.testing.assert_close(topk(test.features), dense(test.features), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------ k-NN
def _knn_reference(q: np.ndarray, keys: np.ndarray, labels: np.ndarray, n_cls: int, k: int, weighting: str
                   ) -> np.ndarray:
    """Brute-force weighted k-NN votes, written independently: sort every key by cosine, weight the k best."""
    out = np.zeros((len(q), n_cls))
    for i, x in enumerate(q):
        sims = keys @ x
        order = np.argsort(-sims, kind="stable")[:k]
        for j in order:
            if weighting == "uniform":
                w = 1.0
            elif weighting == "inverse":
                w = 1.0 / (1.0 - sims[j] + 1e-6)
            else:
                w = np.exp(sims[j] / float(weighting[4:]))
            out[i, labels[j]] += w
    return out / out.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("lookup", ["dense", "topk"])
@pytest.mark.parametrize("k,weighting", [(1, "uniform"), (5, "uniform"), (7, "inverse"), (9, "exp:0.1")])
def test_knn_matches_a_brute_force_vote(lookup, k, weighting):
    support, text, _, test = feature_task(5, 16)
    knn = KNN(k=k, weighting=weighting, search=False, lookup=lookup)
    knn.setup(_ctx(support, text))
    ref = _knn_reference(test.features.double().numpy(), support.keys.double().numpy(), support.labels.numpy(), 5,
                         k, weighting)
    probs = knn(test.features).softmax(dim=1).double().numpy()
    np.testing.assert_allclose(probs, ref, atol=1e-4)
    assert np.array_equal(knn(test.features).argmax(1).numpy(), ref.argmax(1))


def test_knn_search_picks_the_best_val_setting():
    support, text, val, _ = feature_task(5, 16)
    knn = KNN(k_values=[1, 3, 40], weightings=["uniform", "exp:0.05"])
    knn.setup(_ctx(support, text))
    record = knn.tune(val)
    accs = {(k, w): float((torch.from_numpy(_knn_reference(val.features.double().numpy(),
                                                             support.keys.double().numpy(), support.labels.numpy(),
                                                             5, k, w)).argmax(1) == val.labels).float().mean() * 100)
            for k in (1, 3, 40) for w in ("uniform", "exp:0.05")}
    best = max(accs.values())
    assert record["val_acc"] == pytest.approx(best)
    assert accs[(knn.k, knn.weighting)] == pytest.approx(best)
    assert next(kw for kw, a in accs.items() if a == best) == (knn.k, knn.weighting)  # the first best wins


# ------------------------------------------------------------------------------------------ pools
def _pool_world():
    """Three classes with text embeddings t_c and two shots each; the pool holds, for every class, two images
    close to its text, two close to its shots, and unrelated images. Returns what each query should find."""
    dim = 48
    basis = torch.eye(dim)
    text = basis[[0, 1, 2]]
    shots = F.normalize(basis[[10, 11, 20, 21, 30, 31]] + 0.3 * basis[[0, 0, 1, 1, 2, 2]], dim=-1)
    shot_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pool, near_text, near_shots = [], {}, {}
    for c in range(3):
        near_text[c] = [len(pool), len(pool) + 1]
        pool += [F.normalize(text[c] + 0.1 * basis[40 + c], dim=0), F.normalize(text[c] + 0.2 * basis[43 + c], dim=0)]
        near_shots[c] = [len(pool), len(pool) + 1]
        pool += [F.normalize(shots[2 * c] + 0.05 * basis[46], dim=0), F.normalize(shots[2 * c + 1] + 0.1 * basis[47],
                                                                                    dim=0)]
    far = basis[[5, 6, 7, 8, 9, 12, 13, 14]]  # orthogonal to every text embedding and shot
    pool = torch.stack(pool + list(far))
    return pool, text, shots, shot_labels, near_text, near_shots


def test_pool_retrieval_finds_the_known_neighbours():
    pool, text, shots, shot_labels, near_text, near_shots = _pool_world()
    index = KeyIndex(build_index(pool.numpy(), "Flat"))
    by_text = retrieve(index, text, shots, shot_labels, 2, "text")
    by_image = retrieve(index, text, shots, shot_labels, 2, "image")
    both = retrieve(index, text, shots, shot_labels, 4, "both")
    for c in range(3):
        assert by_text[c][1].tolist() == near_text[c]  # nearer first
        assert sorted(by_image[c][1].tolist()) == near_shots[c]
        assert sorted(both[c][1].tolist()) == sorted(near_text[c] + near_shots[c])
    grown = grow(pool, by_text, text, threshold=0.0)
    assert sorted(grown.rows.tolist()) == sorted(r for c in range(3) for r in near_text[c])
    assert all(grown.labels[grown.rows == r].item() == c for c in range(3) for r in near_text[c])


def test_a_pool_image_claimed_by_two_classes_goes_to_the_more_probable_one_and_the_threshold_drops():
    text = torch.eye(4)[:2]
    pool = F.normalize(torch.tensor([[1.0, 0.9, 0, 0], [0.2, 1.0, 0, 0], [0.6, 0.6, 0.1, 0]]), dim=-1)
    cands = [(torch.tensor([0.9, 0.8]), torch.tensor([0, 2])), (torch.tensor([0.9, 0.7]), torch.tensor([1, 0]))]
    grown = grow(pool, cands, text, threshold=0.0)
    probs = (100 * pool @ text.t()).softmax(1)
    assert dict(zip(grown.rows.tolist(), grown.labels.tolist())) == {0: int(probs[0].argmax()), 1: 1, 2: 0}
    strict = grow(pool, cands, text, threshold=0.9)
    assert all(probs[r, y] >= 0.9 for r, y in zip(strict.rows.tolist(), strict.labels.tolist()))
    assert 2 not in strict.rows.tolist()  # an even split between the classes is not confident
    with pytest.raises(PoolError):
        PoolChoice(4, by="colour")


def test_load_pool_lists_images_and_leaves_the_datasets_own_out(tmp_path):
    from conftest import make_class_folder

    make_class_folder(tmp_path / "pool", {"a": 3, "b": 2})
    (tmp_path / "pool" / "notes.txt").write_text("x")
    mine = str((tmp_path / "pool" / "a" / "img000.png").resolve())
    ds = load_pool(str(tmp_path / "pool"), exclude={mine})
    assert len(ds.splits["train"]) == 4 and mine not in {s.path for s in ds.splits["train"]}
    (tmp_path / "list.csv").write_text("path\npool/b/img000.png\npool/b/img001.png\n")
    assert len(load_pool(str(tmp_path / "list.csv")).splits["train"]) == 2
    with pytest.raises(PoolError, match="no such folder"):
        load_pool(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------ GPU and packaging
@pytest.mark.gpu
@pytest.mark.skipif(not faiss_has_gpu(), reason="needs faiss with GPU support and a CUDA device")
def test_gpu_search_matches_cpu():
    keys = _keys(5000, 64)
    cpu = KeyIndex(build_index(keys.numpy(), "IVF16,Flat"), "IVF16,Flat", params="nprobe=16", use_gpu=False)
    gpu = KeyIndex(cpu.index, "IVF16,Flat", params="nprobe=16", use_gpu=True)
    s_cpu, r_cpu = cpu.search(keys[:100], 10)
    s_gpu, r_gpu = gpu.search(keys[:100].cuda(), 10)
    assert gpu.device.startswith("cuda") and s_gpu.device.type == "cuda"
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-4, rtol=1e-4)
    assert (r_gpu.cpu() == r_cpu).float().mean() > 0.99


def test_without_cuda_the_index_stays_on_the_cpu():
    index = KeyIndex(build_index(_keys(100).numpy(), "Flat"))
    index.search(_keys(3), 2)
    assert index.device == ("cpu" if not faiss_has_gpu() else index.device)


def test_faiss_imports_from_exactly_one_distribution_and_no_extra_adds_another():
    import faiss

    assert faiss.IndexFlatIP(4).d == 4
    assert len(faiss_distributions()) == 1, faiss_distributions()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def faiss_reqs(reqs):
        return [r for r in reqs if re.match(r"\s*faiss", r)]

    assert len(faiss_reqs(project["dependencies"])) == 1
    for extra, reqs in project["optional-dependencies"].items():
        assert not faiss_reqs(reqs), f"extra [{extra}] would install a second faiss beside the required one"



# ------------------------------------------------------------------------------------------ through the runner
def _run(tmp_path: Path, *extra: str) -> dict:
    from fewclip.config import compose
    from fewclip.runner import run

    cfg = compose([f"cache_dir={tmp_path / 'cache'}", "progress=false", "device=cpu", "dataset=folder",
                   f"dataset.root={tmp_path / 'imgs'}", "shots=3", "views=2", *extra])
    return run(cfg, out_dir=tmp_path / f"out{len(list(tmp_path.glob('out*')))}")


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    from conftest import make_class_folder

    make_class_folder(tmp_path / "imgs", {"red_fox": 8, "blue_jay": 8, "green_tree": 8})
    make_class_folder(tmp_path / "pool", {"u": 0, "v": 0, "w": 0, "x": 6, "y": 6, "z": 6}, seed=7)
    return tmp_path


def test_a_run_grows_its_cache_from_a_pool_chosen_on_val_and_records_the_provenance(folders):
    res = _run(folders, "adapter=tip", "adapter.beta_steps=4", "adapter.alpha_steps=4", f"pool={folders / 'pool'}",
               "pool.per_class=[0,2,4]", "pool.by=[text,image]", "pool.threshold=[0.0]")
    pool = res["pool"]
    # the plain cache once, then 2 sizes x 2 queries
    assert [(c["per_class"], c.get("by")) for c in pool["candidates"]] == \
        [(0, "text"), (2, "text"), (2, "image"), (4, "text"), (4, "image")]
    accs = [c["val_acc"] for c in pool["candidates"]]
    best = pool["candidates"][accs.index(max(accs))]  # the first best
    assert pool["chosen"] == {k: best[k] for k in ("per_class", "by", "threshold")} and res["val_acc"] == max(accs)
    assert pool["n_images"] == 18 and res["n_support"] == 9 + pool["added"] == 9 + sum(pool["added_per_class"])
    store = KVStore.load(res["cache"]["support"]["path"])
    if pool["added"]:
        assert store.manifest["spec"]["kind"] == "support-grown" and len(store) == res["n_support"]
        from_pool = [r for r in store.meta if r["source"] == "pool"]
        assert len(from_pool) == pool["added"] and all(r["by"] == pool["chosen"]["by"] for r in from_pool)
        assert {r["id"] for r in from_pool} <= {str(p.relative_to(folders / "pool")) for p in
                                                 (folders / "pool").rglob("*.png")}
    assert "pool" in res["cache"]


def test_a_pool_that_is_the_dataset_itself_is_left_out(folders):
    with pytest.raises(PoolError, match="holds no images"):
        _run(folders, "adapter=zero_shot", f"pool={folders / 'imgs'}")


def test_an_approximate_index_runs_through_fit_and_predict(folders):
    from fewclip.artifact import fit, load_artifact

    clf = fit(folders / "imgs", adapter="knn", shots=3, out=folders / "art", cache_dir=str(folders / "cache"),
              views=2, progress=False, **{"cache.index": "HNSW8", "adapter.dense_max_keys": 4})
    result = json.loads((folders / "art" / "result.json").read_text())
    assert result["lookup"]["mode"] == "topk" and result["lookup"]["index"] == "HNSW8"
    assert result["cache"]["support"]["path"] and clf.support_store.index_factory == "HNSW8"
    again = load_artifact(folders / "art", device="cpu")
    assert again.adapter.lookup_record()["class"] == "IndexHNSWFlat"
    images = sorted(str(p) for p in (folders / "imgs").rglob("*.png"))[:5]
    probs = again.predict(images)
    assert probs.shape == (5, 3) and torch.allclose(probs.sum(1), torch.ones(5))


# ------------------------------------------------------------------------------------------ benchmark and eval scripts
def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_recall_counts_the_exact_neighbours_found():
    bench = _script("bench_faiss")
    found = torch.tensor([[1, 2, 3, 9], [5, 6, 7, 8]])
    exact = torch.tensor([[3, 2, 1, 0], [0, 1, 2, 5]])
    # first query: 3 of the exact top-3 {3,2,1} in the first 3 found; second: only 5 of {0,1,2}? none -> 0
    assert bench.recall(found, exact, 3) == pytest.approx((3 / 3 + 0 / 3) / 2)
    assert bench.recall(found, exact, 4) == pytest.approx((3 / 4 + 1 / 4) / 2)


def test_bench_tuning_picks_the_cheapest_nprobe_that_reaches_the_target_on_its_queries():
    import faiss

    bench = _script("bench_faiss")
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(20, 16, generator=g)
    keys = F.normalize(centres[torch.arange(4000) % 20] + 0.6 * torch.randn(4000, 16, generator=g), dim=-1)
    queries = F.normalize(centres[torch.arange(200) % 20] + 0.6 * torch.randn(200, 16, generator=g), dim=-1)
    exact = (queries @ keys.t()).topk(16, dim=1).indices
    index = build_index(keys.numpy(), "IVF32,Flat")
    target = 0.97
    # independently: recall@16 of the rescored top-32 candidates at each nprobe, through faiss directly
    ivf = faiss.extract_index_ivf(index)
    expected, recalls = None, {}
    for n in (1, 2, 4, 8, 16, 32):
        ivf.nprobe = n
        _, rows = index.search(queries.numpy(), 32)
        rows = torch.from_numpy(rows)
        best = torch.gather(rows, 1, ((queries[:, None] * keys[rows]).sum(-1)).argsort(1, descending=True))[:, :16]
        recalls[n] = np.mean([len(set(b.tolist()) & set(e.tolist())) / 16 for b, e in zip(best, exact)])
        if expected is None and recalls[n] >= target:
            expected = f"nprobe={n}"
    assert expected is not None and expected != "nprobe=1", recalls  # the grid matters on this set
    chosen, tried = bench.tune_settings(KeyIndex(index, "IVF32,Flat"), queries, exact, keys, 32, target)
    assert chosen == expected
    assert [r for _, r in tried] == pytest.approx([recalls[int(s.split("=")[1])] for s, _ in tried])
    assert all(r < target for _, r in tried[:-1]) and tried[-1][1] >= target


def test_eval_pool_scores_pseudo_labels_against_the_true_classes(tmp_path):
    pool_eval = _script("eval_pool")
    (tmp_path / "meta.csv").write_text(
        "row,id,label,classname,source,by,similarity,confidence\n"
        "0,train/a/1.png,0,cat,shot,,,\n"
        "1,00001.png,0,cat,pool,image,0.9,0.5\n"
        "2,00002.png,1,dog,pool,image,0.9,0.5\n"
        "3,00003.png,1,dog,pool,text,0.9,0.5\n")
    (tmp_path / "truth.csv").write_text("id,classname\n00001.png,cat\n00002.png,cat\n00003.png,dog\n00004.png,dog\n")
    assert pool_eval.pseudo_label_purity(tmp_path / "meta.csv", tmp_path / "truth.csv") == (2, 3)


def test_eval_pool_writes_disjoint_labelled_splits_and_a_pool_whose_true_classes_match_the_images(tmp_path):
    import argparse
    import gzip

    from PIL import Image

    from caches.data.datasets import FASHION_CLASSES

    def idx(path: Path, array: np.ndarray) -> None:
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    y_train, y_test = rng.permutation(np.arange(300) % 10), np.arange(60) % 10
    # every image's pixels carry its class (20 * label) and its row (two more pixels), so the files can be checked
    x_train = np.zeros((300, 28, 28), np.uint8)
    x_train[:, 0, 0], x_train[:, 0, 1], x_train[:, 0, 2] = 20 * y_train, np.arange(300) // 256, np.arange(300) % 256
    x_test = np.zeros((60, 28, 28), np.uint8)
    x_test[:, 0, 0] = 20 * y_test
    idx(src / "train-images-idx3-ubyte.gz", x_train)
    idx(src / "train-labels-idx1-ubyte.gz", y_train)
    idx(src / "t10k-images-idx3-ubyte.gz", x_test)
    idx(src / "t10k-labels-idx1-ubyte.gz", y_test)
    out = tmp_path / "fm"
    pool_eval = _script("eval_pool")
    pool_eval.write_fashion_mnist(argparse.Namespace(
        fashion_root=str(src), seed=0, write_fashion_mnist=str(out), shots=2, val_per_class=3, test_per_class=4,
        pool_size=100))
    names = {c.replace("/", " or "): i for i, c in enumerate(FASHION_CLASSES)}

    def pixels(p: Path) -> tuple[int, int]:
        a = np.asarray(Image.open(p)).astype(int)
        return a[0, 0], 256 * a[0, 1] + a[0, 2]

    train_rows = set()
    for split, per in (("train", 2), ("val", 3), ("test", 4)):
        folders = sorted((out / "labelled" / split).iterdir())
        assert len(folders) == 10
        for folder in folders:
            files = sorted(folder.glob("*.png"))
            assert len(files) == per
            assert {pixels(f)[0] for f in files} == {20 * names[folder.name.replace("_", " ")]}
            if split != "test":
                rows = {pixels(f)[1] for f in files}
                assert not rows & train_rows  # train and val never share an image
                train_rows |= rows
    truth = dict(line.split(",") for line in (out / "pool_labels.csv").read_text().splitlines()[1:])
    pool_files = sorted((out / "pool").glob("*.png"))
    assert len(pool_files) == len(truth) == 100
    for f in pool_files:
        label, row = pixels(f)
        assert label == 20 * names[truth[f.name]] and row not in train_rows  # no labelled image in the pool


def test_bench_tuning_counts_a_setting_that_finds_fewer_than_k_as_recall_zero():
    bench = _script("bench_faiss")
    keys, queries = _keys(1000, 16, seed=4), _keys(50, 16, seed=5)
    exact = (queries @ keys.t()).topk(16, dim=1).indices
    index = KeyIndex(build_index(keys.numpy(), "IVF40,Flat"), "IVF40,Flat")  # ~25 keys per list, k = 64
    chosen, tried = bench.tune_settings(index, queries, exact, keys, 64, 0.99)
    assert tried[0] == ("nprobe=1", 0.0)
    assert tried[-1][1] >= 0.99 and chosen == tried[-1][0]
