"""``adapter=auto``: selection on validation data only, ties to the cheaper method, test labels untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_features

from adapters.base import AdapterContext, FeatureSplit, SupportSet, accuracy
from fewclip.auto import Auto

C, D = 5, 16


def _task(shots: int, text_noise: float = 3.0):
    keys, labels, means = synthetic_features(C, shots, D, noise=0.3, seed=0)
    g = torch.Generator().manual_seed(1)
    views = F.normalize(keys[None] + 0.1 * torch.randn(2, *keys.shape, generator=g), dim=-1)
    text = F.normalize(means + text_noise * torch.randn(C, D, generator=g), dim=-1)  # a poor zero-shot head
    val = FeatureSplit(*synthetic_features(C, min(shots, 4), D, noise=0.3, seed=2, means=means)[:2])
    return SupportSet(keys=F.normalize(views.mean(0), dim=-1), labels=labels, views=views), text, val


def _setup(adapter, support, text):
    adapter.setup(AdapterContext(classnames=[f"c{i}" for i in range(C)], text_head=text, support=support,
                                 progress=False))
    return adapter


def test_auto_keeps_the_candidate_with_the_best_val_accuracy():
    support, text, val = _task(shots=8)
    auto = _setup(Auto(candidates=["zero_shot", "tip", "gda"]), support, text)
    record = auto.fit(support, val)
    auto.tune(val)
    cands = record["candidates"]
    # zero-shot's val accuracy, computed here from the text head
    assert cands["zero_shot"]["val_acc"] == pytest.approx(accuracy(val.features @ text.t(), val.labels))
    best = max(cands, key=lambda n: cands[n]["score"])
    assert record["chosen"] == auto.choice == best and cands[best]["score"] > cands["zero_shot"]["score"]
    assert all("cv_acc" not in r for r in cands.values())  # 8 shots: val only
    # auto predicts exactly what its winner predicts
    torch.testing.assert_close(auto.predict(val.features), auto.chosen.predict(val.features))
    assert auto.hparams()["choice"] == best


def test_ties_keep_the_cheaper_candidate_listed_first():
    support, text, val = _task(shots=8, text_noise=0.0)  # a perfect text head: everything scores 100%
    auto = _setup(Auto(candidates=["zero_shot", "tip"]), support, text)
    record = auto.fit(support, val)
    assert record["candidates"]["zero_shot"]["score"] == record["candidates"]["tip"]["score"] == 100.0
    assert auto.choice == "zero_shot"


def test_two_shots_pool_val_with_a_support_cross_validation():
    support, text, val = _task(shots=2)
    auto = _setup(Auto(candidates=["zero_shot", "tip"]), support, text)
    cands = auto.fit(support, val)["candidates"]
    # zero-shot needs no fitting: its cross-validation accuracy is its accuracy on the support keys
    assert cands["zero_shot"]["cv_acc"] == pytest.approx(accuracy(support.keys @ text.t(), support.labels))
    n_val, n_cv = len(val), len(support)
    for r in cands.values():
        assert r["score"] == pytest.approx((r["val_acc"] * n_val + r["cv_acc"] * n_cv) / (n_val + n_cv))


def test_the_held_out_shot_is_not_in_a_cross_validation_fit():
    """Tip-Adapter's cross-validation score, recomputed here: each fold's cache holds the other shot only."""
    from adapters.tip import TipAdapter

    support, text, val = _task(shots=2)
    # alpha up to 1000 lets the cache outweigh the (poor) zero-shot logits: a leaked held-out key, its own nearest
    # neighbour, would then score 100% (it does with the context's full support: 100% instead of 60%)
    grid = {"beta_steps": 8, "alpha_steps": 4, "alpha_max": 1000.0, "beta_max": 20.0}
    auto = _setup(Auto(candidates=["tip"], overrides={"tip": grid}), support, text)
    cv_acc = auto.fit(support, val)["candidates"]["tip"]["cv_acc"]
    rank = torch.zeros_like(support.labels)
    for c in range(C):
        idx = (support.labels == c).nonzero().flatten()
        rank[idx] = torch.arange(len(idx))
    correct = 0
    for f in (0, 1):
        keep = rank != f
        part = SupportSet(keys=support.keys[keep], labels=support.labels[keep], views=support.views[:, keep])
        tip = _setup(TipAdapter(**grid), part, text)
        tip.tune(val)
        correct += int((tip.predict(support.keys[~keep]).argmax(-1) == support.labels[~keep]).sum())
    assert cv_acc == pytest.approx(100.0 * correct / len(support)) and cv_acc < 100


def test_pixel_candidates_are_refused():
    support, text, val = _task(shots=4)
    auto = _setup(Auto(candidates=["zero_shot", "coop_pixels"]), support, text)
    with pytest.raises(ValueError, match="pixels"):
        auto.fit(support, val)


def test_auto_never_reads_test_labels_before_the_final_evaluation(tmp_path, monkeypatch):
    """Test samples whose labels raise until the runner's final evaluation starts."""
    import json

    from caches.data import datasets
    from caches.data.records import Sample
    from fewclip import runner
    from fewclip.config import compose

    state = {"final": False, "reads": 0}

    class GuardedSample(Sample):
        @property
        def label(self) -> int:
            if not state["final"]:
                raise AssertionError("a test label was read before the final evaluation")
            state["reads"] += 1
            return self._label

        @label.setter
        def label(self, value: int) -> None:
            object.__setattr__(self, "_label", value)

    real_load = datasets.load_digits

    def guarded_load(*args, **kwargs):
        ds = real_load(*args, **kwargs)
        ds.splits["test"] = [GuardedSample(id=s.id, label=s.label, path=s.path) for s in ds.splits["test"]]
        return ds

    real_eval_split = runner.eval_split

    def final_eval_split(*args, **kwargs):
        state["final"] = True
        return real_eval_split(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_digits", guarded_load)
    monkeypatch.setattr(runner, "eval_split", final_eval_split)
    cfg = compose([f"cache_dir={tmp_path / 'cache'}", "progress=false", "device=cpu", "adapter=auto", "shots=2",
                   "views=2", "adapter.candidates=[zero_shot,tip,linear_probe]"])
    res = runner.run(cfg, out_dir=tmp_path / "out")
    assert state["reads"] > 0  # the guard was live: the final evaluation read the labels
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert set(saved["selection"]["fit"]["candidates"]) == {"zero_shot", "tip", "linear_probe"}
    assert saved["hparams"]["choice"] == res["hparams"]["choice"]


def test_a_saved_auto_run_restores_its_winner(tmp_path):
    from caches.store import KVStore
    from fewclip.config import compose
    from fewclip.runner import restore_adapter, run

    cfg = compose([f"cache_dir={tmp_path / 'cache'}", "progress=false", "device=cpu", "adapter=auto", "shots=4",
                   "views=2", "adapter.candidates=[zero_shot,linear_probe,clip_adapter]",
                   "+adapter.overrides.clip_adapter.epochs=3"])
    res = run(cfg, out_dir=tmp_path / "out")
    stores = {k: KVStore.load(v["path"]) for k, v in res["cache"].items()}
    support = SupportSet(keys=stores["support"].keys(), labels=stores["support"].labels())
    fresh = Auto(candidates=["zero_shot", "linear_probe", "clip_adapter"])
    fresh.setup(AdapterContext(classnames=[str(i) for i in range(10)], text_head=stores["text"].keys(),
                               support=support, progress=False))
    restore_adapter(fresh, tmp_path / "out")
    x, y = stores["test"].keys(), stores["test"].labels()
    assert fresh.choice == res["hparams"]["choice"]
    assert accuracy(fresh.predict(x), y) == pytest.approx(res["test_acc"])


def test_the_budget_skips_candidates_predicted_not_to_fit_and_says_why(monkeypatch):
    from adapters.gda import GDA
    from adapters.tip import TipAdapter

    support, text, val = _task(shots=8)
    monkeypatch.setattr(TipAdapter, "estimate_fit_seconds", lambda self, *a, **k: 1e6)
    monkeypatch.setattr(GDA, "estimate_fit_seconds", lambda self, *a, **k: 0.5)
    auto = _setup(Auto(candidates=["zero_shot", "tip", "gda"], budget_s=60), support, text)
    record = auto.fit(support, val)
    cands = record["candidates"]
    assert set(record["skipped"]) == {"tip"} and "score" not in cands["tip"]
    assert "predicted 1000000 s" in cands["tip"]["skipped"] and "budget_s=60" in cands["tip"]["skipped"]
    assert cands["tip"]["predicted_s"] == 1e6 and cands["gda"]["predicted_s"] == 0.5 and "score" in cands["gda"]
    assert auto.choice in ("zero_shot", "gda")
    # the first candidate is fitted whatever its prediction, so auto always has an answer
    monkeypatch.setattr(TipAdapter, "estimate_fit_seconds", lambda self, *a, **k: 1e6)
    only = _setup(Auto(candidates=["tip", "gda"], budget_s=1), support, text).fit(support, val)
    assert "score" in only["candidates"]["tip"] and only["chosen"] in ("tip", "gda")
    # no budget: every candidate runs
    assert not _setup(Auto(candidates=["zero_shot", "tip"], budget_s=0), support, text).fit(support, val)["skipped"]


def test_only_the_best_candidate_so_far_stays_in_memory(monkeypatch):
    import gc
    import weakref

    support, text, val = _task(shots=8)
    auto = _setup(Auto(candidates=["zero_shot", "tip", "gda", "linear_probe"]), support, text)
    made = []
    original = Auto._candidate

    def tracked(self, name, ctx):
        adapter = original(self, name, ctx)
        made.append((name, weakref.ref(adapter)))
        return adapter

    monkeypatch.setattr(Auto, "_candidate", tracked)
    auto.fit(support, val)
    gc.collect()
    alive = [name for name, ref in made if ref() is not None]
    assert alive == [auto.choice]


def test_a_candidate_whose_fit_fails_is_dropped_with_its_reason(caplog):
    from adapters.training import DegenerateFitError

    support, text, val = _task(shots=8)
    # lr 0: Tip-Adapter-F's keys never move, and its solver check refuses the fit (DegenerateFitError)
    auto = _setup(Auto(candidates=["zero_shot", "tip_f", "gda"], overrides={"tip_f": {"lr": 0.0, "epochs": 2}},
                       budget_s=0), support, text)
    with caplog.at_level("WARNING"):
        record = auto.fit(support, val)
    cands = record["candidates"]
    assert set(record["failed"]) == {"tip_f"} and "score" not in cands["tip_f"]
    assert cands["tip_f"]["failed"].startswith("DegenerateFitError") and "never changed" in cands["tip_f"]["failed"]
    assert "score" in cands["gda"] and auto.choice in ("zero_shot", "gda")
    assert any("dropping tip_f" in r.getMessage() for r in caplog.records)
    # the first candidate failing: the next one is fitted whatever the budget says, so auto still has an answer
    only = _setup(Auto(candidates=["tip_f", "gda"], overrides={"tip_f": {"lr": 0.0, "epochs": 2}}, budget_s=1e-9),
                  support, text).fit(support, val)
    assert only["chosen"] == "gda" and set(only["failed"]) == {"tip_f"}
    # every candidate failing is an error naming each one's reason
    with pytest.raises(DegenerateFitError, match="no candidate could be fitted.*tip_f: DegenerateFitError"):
        _setup(Auto(candidates=["tip_f"], overrides={"tip_f": {"lr": 0.0, "epochs": 2}}), support, text).fit(
            support, val)
