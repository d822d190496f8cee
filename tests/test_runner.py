"""The runner end to end: result.json, cache reuse, the test split read once, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from caches.store import KVStore
from fewclip.config import compose
from fewclip.runner import run

REQUIRED = {"dataset", "adapter", "backbone", "shots", "seed", "n_classes", "n_test", "test_acc", "val_acc",
            "hparams", "selection", "cache", "timings_s", "versions", "config"}


def _cfg(tmp_path: Path, *extra: str):
    return compose([f"cache_dir={tmp_path / 'cache'}", "progress=false", "device=cpu", *extra])


def test_tip_run_writes_a_result_that_an_independent_computation_reproduces(tmp_path):
    res = run(_cfg(tmp_path, "adapter=tip", "shots=4", "views=2", "adapter.beta_steps=10",
                   "adapter.alpha_steps=5"), out_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert REQUIRED <= set(saved)
    assert saved["dataset"] == "digits" and saved["adapter"] == "tip" and saved["backbone"] == "tiny"
    assert saved["n_classes"] == 10 and saved["shots"] == 4 and saved["n_support"] == 40
    assert saved["n_val"] == 40  # min(K, 4) = 4 per class
    assert set(saved["timings_s"]) >= {"encode", "fit", "search", "eval", "total"}
    assert saved["selection"]["on"] == "val"
    assert saved["config"]["adapter"]["_target_"] == "adapters.tip.TipAdapter"
    assert res["test_acc"] == saved["test_acc"]

    # Recompute the test accuracy from the stores with the chosen hparams, by the paper's formula.
    stores = {k: KVStore.load(v["path"], v["fingerprint"]) for k, v in saved["cache"].items()}
    keys, vals = stores["support"].keys(), stores["support"].labels()
    text, x, y = stores["text"].keys(), stores["test"].keys(), stores["test"].labels()
    a, b = saved["hparams"]["alpha"], saved["hparams"]["beta"]
    logits = 100 * x @ text.t() + a * torch.exp(-b * (1 - x @ keys.t())) @ F.one_hot(vals, 10).float()
    expected = float((logits.argmax(1) == y).float().mean()) * 100
    assert saved["test_acc"] == pytest.approx(expected, abs=1e-6)
    assert saved["n_test"] == len(y) == 539

    again = run(_cfg(tmp_path, "adapter=tip", "shots=4", "views=2", "adapter.beta_steps=10",
                     "adapter.alpha_steps=5"), out_dir=tmp_path / "out2")
    assert again["cache_activity"]["encoded_images"] == 0 and again["cache_activity"]["built"] == []
    assert again["test_acc"] == saved["test_acc"] and again["hparams"] == saved["hparams"]


def test_test_split_is_read_once_and_last(tmp_path, monkeypatch):
    from adapters import tip as tip_module
    from caches import builder as builder_module

    events: list[str] = []
    real_features = builder_module.CacheBuilder.features
    real_tune = tip_module.TipAdapter.tune

    def features(self, dataset, split, samples):
        events.append(f"features:{split}")
        return real_features(self, dataset, split, samples)

    def tune(self, val):
        events.append("tune")
        assert len(val) == 10 * 2
        return real_tune(self, val)

    monkeypatch.setattr(builder_module.CacheBuilder, "features", features)
    monkeypatch.setattr(tip_module.TipAdapter, "tune", tune)
    run(_cfg(tmp_path, "adapter=tip", "shots=2", "views=1", "adapter.beta_steps=4", "adapter.alpha_steps=4"),
        out_dir=tmp_path / "o")
    assert events == ["features:val", "tune", "features:test"]


def test_folder_dataset_run(tmp_path, split_folder):
    res = run(_cfg(tmp_path, "dataset=folder", f"dataset.root={split_folder}", "adapter=zero_shot", "shots=3",
                   "views=1"), out_dir=tmp_path / "o")
    assert res["n_classes"] == 2 and res["n_test"] == 8 and res["n_support"] == 6
    assert res["protocol"]["split_source"] == "given"


def _fewclip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fewclip", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_run_and_sweep(tmp_path):
    common = [f"cache_dir={tmp_path / 'cache'}", "shots=1", "views=1", "progress=false",
              "adapter.beta_steps=5", "adapter.alpha_steps=5"]
    p = _fewclip("run", "adapter=tip", *common, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["adapter"] == "tip" and "test" in p.stdout

    p = _fewclip("run", "-m", "adapter=zero_shot,tip", *common[:-2], f"hydra.sweep.dir={tmp_path / 'sweep'}",
                 cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    found = sorted(json.loads(f.read_text())["adapter"] for f in (tmp_path / "sweep").rglob("result.json"))
    assert found == ["tip", "zero_shot"]

    p = _fewclip("run", "adapter=nope", cwd=tmp_path)
    assert p.returncode != 0 and "Available options" in p.stderr + p.stdout

    p = _fewclip("run", "dataset=folder", f"dataset.root={tmp_path / 'missing'}", *common[:-2], cwd=tmp_path)
    assert p.returncode == 2 and "does not exist" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr


def test_fitted_state_is_saved_and_restores_the_same_predictions(tmp_path):
    from hydra.utils import instantiate

    from adapters.base import AdapterContext, SupportSet
    from fewclip.runner import restore_adapter

    cfg = _cfg(tmp_path, "adapter=tip_f", "shots=2", "views=2", "adapter.epochs=3", "adapter.beta_steps=5",
               "adapter.alpha_steps=5")
    res = run(cfg, out_dir=tmp_path / "o")
    assert res["adapter_state"] == "adapter.safetensors" and (tmp_path / "o" / "adapter.safetensors").is_file()
    assert res["selection"]["fit"]["selected_by"] == "val"
    stores = {k: KVStore.load(v["path"], v["fingerprint"]) for k, v in res["cache"].items()}
    support = SupportSet(stores["support"].keys(), stores["support"].labels(), stores["support"].view_features())
    fresh = instantiate(cfg.adapter)
    fresh.setup(AdapterContext(classnames=[str(i) for i in range(10)], text_head=stores["text"].keys(),
                               support=support))
    before = fresh.predict(stores["test"].keys())
    restore_adapter(fresh, tmp_path / "o")
    after = fresh.predict(stores["test"].keys())
    acc = float((after.argmax(1) == stores["test"].labels()).float().mean()) * 100
    assert acc == pytest.approx(res["test_acc"])
    assert not torch.equal(before, after)  # the trained keys (and chosen alpha/beta) really were loaded
    # the saved state holds only what the adapter learned
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "o" / "adapter.safetensors"))) == {"keys"}


def test_pixel_mode_coop_matches_feature_evaluation(tmp_path):
    """CoOp trained on pixels: its pixel-path test logits equal the same prompts on cached test features."""
    from hydra.utils import instantiate

    from adapters.base import AdapterContext, SupportSet, accuracy, predict_split
    from adapters.coop import CoOp, CoOpPixels
    from caches.backbone import FrozenClip
    from caches.builder import CacheBuilder
    from fewclip.runner import restore_adapter

    common = ["shots=1", "views=1", "adapter.epochs=2", "adapter.batch_size=4", "batch_size=128"]
    res = run(_cfg(tmp_path, "adapter=coop_pixels", *common), out_dir=tmp_path / "px")
    assert res["selection"]["fit"]["mode"].startswith("pixels") and "test" not in res["cache"]
    zs = run(_cfg(tmp_path, "adapter=zero_shot", *common[:2]), out_dir=tmp_path / "zs")
    stores = {k: KVStore.load(v["path"], v["fingerprint"]) for k, v in zs["cache"].items()}
    from caches.data.datasets import DIGIT_NAMES, load_digits

    backbone = FrozenClip("fewclip-tiny", None, device="cpu")
    ctx = AdapterContext(classnames=list(DIGIT_NAMES), text_head=stores["text"].keys(),
                         support=SupportSet(stores["support"].keys(), stores["support"].labels()), backbone=backbone)
    adapters = {}
    for name, cls in (("coop", CoOp), ("coop_pixels", CoOpPixels)):
        adapters[name] = instantiate(_cfg(tmp_path, f"adapter={name}", *common).adapter)
        assert type(adapters[name]) is cls
        adapters[name].setup(ctx)
        restore_adapter(adapters[name], tmp_path / "px")
    ds = load_digits(['a photo of the number: "{}".'])
    split = CacheBuilder(backbone, tmp_path / "unused", progress=False).pixel_split(ds, ds.splits["test"])
    pixel_logits, pixel_labels = predict_split(adapters["coop_pixels"], split)
    assert accuracy(pixel_logits, pixel_labels) == res["test_acc"]  # the runner's number, recomputed
    feature_logits = adapters["coop"].predict(stores["test"].keys())
    assert torch.equal(pixel_labels, stores["test"].labels())
    torch.testing.assert_close(pixel_logits, feature_logits, rtol=1e-4, atol=1e-3)


def _adapter_yamls() -> list[str]:
    from fewclip.config import group_options

    return group_options("adapter")


@pytest.mark.parametrize("adapter", _adapter_yamls())
def test_every_adapter_runs_on_a_folder_dataset(tmp_path, class_folder, adapter):
    """``fewclip run adapter=NAME dataset=folder``: every adapter YAML fits, selects on val and writes a result."""
    from omegaconf import OmegaConf

    from fewclip.config import conf_dir

    node = OmegaConf.load(conf_dir() / "adapter" / f"{adapter}.yaml")
    short = [f"adapter.epochs={1 if adapter == 'cocoop' else 2}"] if "epochs" in node else []
    res = run(_cfg(tmp_path, "dataset=folder", f"dataset.root={class_folder}", f"adapter={adapter}", "shots=2",
                   "views=2", *short), out_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["adapter"] == adapter and saved["n_classes"] == 3 and saved["n_support"] == 6
    assert 0 <= saved["test_acc"] <= 100 and saved["test_acc"] == res["test_acc"]
    assert saved["n_test"] > 0 and "test" not in saved["selection"]


def test_base_to_novel_scores_the_new_classes_with_what_was_learned_on_the_base_ones(tmp_path):
    from safetensors.torch import load_file

    from adapters.base import AdapterContext, SupportSet, accuracy
    from adapters.coop import CoOp

    common = ["dataset.subsample=base", "shots=2", "views=2"]
    res = run(_cfg(tmp_path, "adapter=coop", "adapter.epochs=3", *common), out_dir=tmp_path / "coop")
    assert res["n_classes"] == 5 and res["protocol"]["subsample"] == "base"
    novel = res["novel"]
    assert novel["n_classes"] == 5 and novel["n_test"] > 0
    # recompute: the learned context, spliced with the new class names, on the new classes' test features
    stores = {k: KVStore.load(v["path"]) for k, v in novel["cache"].items()}
    names = [r["classname"] for r in stores["text"].meta]
    assert names == ["five", "six", "seven", "eight", "nine"]
    coop = CoOp(n_ctx=16)
    from fewclip.runner import instantiate_node

    backbone = instantiate_node(_cfg(tmp_path).backbone)
    coop.setup(AdapterContext(classnames=names, text_head=stores["text"].keys(), backbone=backbone, progress=False,
                              support=SupportSet(keys=torch.empty(0, backbone.dim), labels=torch.empty(0).long())))
    coop.load_state_dict(load_file(str(tmp_path / "coop" / res["adapter_state"])))
    x, y = stores["test"].keys(), stores["test"].labels()
    assert novel["test_acc"] == pytest.approx(accuracy(coop.predict(x), y))
    assert set(y.tolist()) == set(range(5))  # relabelled 0..4 among the new classes

    zs = run(_cfg(tmp_path, "adapter=zero_shot", *common), out_dir=tmp_path / "zs")
    zs_stores = {k: KVStore.load(v["path"]) for k, v in zs["novel"]["cache"].items()}
    expected = accuracy(zs_stores["test"].keys() @ zs_stores["text"].keys().t(), zs_stores["test"].labels())
    assert zs["novel"]["test_acc"] == pytest.approx(expected)

    tip = run(_cfg(tmp_path, "adapter=tip", "adapter.beta_steps=4", "adapter.alpha_steps=4", *common),
              out_dir=tmp_path / "tip")
    assert tip["novel"]["test_acc"] is None and "shots of every class" in tip["novel"]["reason"]
