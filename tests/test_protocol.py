"""protocol=reference end to end: the recipe's per-dataset values, CoOp's few-shot draw, the val split the official
code searched on, un-augmented support features, raw text norms, command-line values as departures."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
from layouts import make_coop
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_fewshot_dassl import dassl_reference

from caches.builder import text_raw_norms
from caches.data.records import ImageDataset, Sample
from caches.store import KVStore
from fewclip.config import compose
from fewclip.protocol import RunProtocol, draw_fewshot, resolve_protocol
from fewclip.recipes import RecipeError
from fewclip.runner import instantiate_node, run

COMMON = ["progress=false", "device=cpu", "shots=2", "seed=2", "views=2"]


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """A mini copy of the Oxford Flowers layout: 4 classes, 6 / 3 / 3 images per split, CoOp's split JSON."""
    root = tmp_path_factory.mktemp("data")
    base = make_coop(root, "oxford_flowers", n_classes=4, per_split=(6, 3, 3))
    return root, json.loads((base / "split_zhou_OxfordFlowers.json").read_text())


def test_reference_tip_on_flowers_uses_the_official_ranges(flowers, tmp_path):
    root, split = flowers
    cfg = compose(["protocol=reference", "adapter=tip", "dataset=oxford_flowers", f"data_root={root}",
                   f"cache_dir={tmp_path / 'c'}", *COMMON])
    res = run(cfg, out_dir=tmp_path / "run")
    # configs/oxford_flowers.yaml: search_scale [50, 50], search_step [200, 20], init (1, 10)
    assert res["recipe"]["adapter"]["beta_max"] == 50 and res["recipe"]["adapter"]["alpha_max"] == 50
    assert res["adapter_config"]["beta_max"] == 50 and res["adapter_config"]["alpha_steps"] == 20
    assert res["selection"]["grid_size"] == 200 * 20
    assert res["recipe"]["sources"]["adapter.beta_max"].startswith("configs/oxford_flowers.yaml")
    assert res["recipe"]["reference"].startswith("gaopengcuhk/Tip-Adapter@")
    # the whole val split (3 per class), not min(K, 4) = 2
    assert res["n_val"] == 12 and res["protocol"]["val_shots"] == "full" and res["protocol"]["name"] == "reference"
    # the support images are Dassl's draw for seed 2 over the split file
    train, _ = dassl_reference(split, 2, 2)
    ids = json.loads(open(res["fewshot_ids"]).read())
    assert ids["train"] == train and ids["source"] == "dassl" and res["protocol"]["sampler"] == "dassl"
    # the chosen beta and alpha lie on the official grid
    assert 0.1 <= res["hparams"]["beta"] < 50 and 0.1 <= res["hparams"]["alpha"] < 50
    assert res["recipe"]["departures"]  # e.g. Tip-Adapter's own seeding
    # the default protocol differs: fewclip's sampler, min(K, 4) val, ImageNet's ranges
    fs = run(compose(["adapter=tip", "dataset=oxford_flowers", f"data_root={root}", f"cache_dir={tmp_path / 'c'}",
                      "adapter.beta_steps=4", "adapter.alpha_steps=4", *COMMON]), out_dir=tmp_path / "fs")
    assert fs["protocol"]["name"] == "fewshot" and fs["n_val"] == 8 and fs["recipe"] is None
    # fewclip's grid: log-spaced over [0.1, 1000] on both axes; the reference's is linear from 0.1
    assert fs["adapter_config"]["grid"] == "log" and fs["adapter_config"]["beta_max"] == 1000.0
    assert res["adapter_config"]["grid"] == "linear"


def test_command_line_values_win_and_are_departures(flowers):
    root, _ = flowers
    cfg = compose(["protocol=reference", "adapter=tip", "dataset=oxford_flowers", f"data_root={root}",
                   "adapter.beta_max=9"])
    proto = resolve_protocol(cfg, "tip", "oxford_flowers")
    assert proto.adapter.beta_max == 9 and proto.adapter.alpha_max == 50
    assert any("adapter.beta_max=9" in d and "50" in d for d in proto.record()["departures"])
    assert proto.views == 10  # the recipe's views ...
    views = resolve_protocol(compose(["protocol=reference", "adapter=tip", "dataset=oxford_flowers",
                                      f"data_root={root}", "views=3"]), "tip", "oxford_flowers")
    assert views.views == 3 and any("views=3" in d for d in views.record()["departures"])  # ... unless given
    with pytest.raises(RecipeError, match="no reference recipe"):
        resolve_protocol(compose(["protocol=reference", "adapter=auto"]), "auto", "digits")
    with pytest.raises(RecipeError, match="per dataset"):
        resolve_protocol(compose(["protocol=reference", "adapter=tip"]), "tip", "digits")
    with pytest.raises(RecipeError, match="protocol must be one of"):
        resolve_protocol(compose(["protocol=papers"]), "tip", "digits")


def test_reference_linear_probe_fits_unaugmented_features_with_lpclips_search(flowers, tmp_path):
    root, _ = flowers
    cfg = compose(["protocol=reference", "adapter=linear_probe", "dataset=oxford_flowers", f"data_root={root}",
                   f"cache_dir={tmp_path / 'c'}", *COMMON])
    res = run(cfg, out_dir=tmp_path / "lp")
    assert res["protocol"]["support_features"] == "plain" and res["n_support"] == 8
    support = KVStore.load(res["cache"]["support"]["path"])
    assert support.manifest["spec"]["kind"] == "features" and support.view_features() is None  # eval transform
    assert res["selection"]["fit"]["method"].startswith("lpclip") and res["n_val"] == 8


def test_reference_taskres_gets_the_raw_text_norms(tmp_path):
    cfg = compose(["protocol=reference", "adapter=taskres", "adapter.epochs=1", f"cache_dir={tmp_path / 'c'}",
                   "progress=false", "device=cpu", "shots=1", "views=1"])
    res = run(cfg, out_dir=tmp_path / "tr")
    state = load_file(str(tmp_path / "tr" / res["adapter_state"]))
    norms = text_raw_norms(KVStore.load(res["cache"]["text"]["path"]))
    assert norms is not None and not torch.allclose(norms, torch.ones_like(norms))
    torch.testing.assert_close(state["base_norms"], norms)
    assert res["adapter_config"]["betas"] == [0.9, 0.999] and res["adapter_config"]["select"] == "last"
    assert any("adapter.epochs=1" in d for d in res["recipe"]["departures"])


def test_imported_imagenet_draw_keeps_support_out_of_val(tmp_path, monkeypatch):
    """CoOp's ImageNet pickle holds train only; fewclip carves val from train, so the two can overlap."""
    import types

    mod = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath, label):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, f"c{label}"

    Datum.__module__, Datum.__qualname__ = mod.__name__, "Datum"
    mod.Datum = Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    train = [Sample(f"train/c{c}/{i}.jpg", c) for c in range(3) for i in range(6)]
    val = [Sample(f"train/c{c}/{i}.jpg", c) for c in range(3) for i in range(6, 9)]
    ds = ImageDataset("imagenet", ["a", "b", "c"], ["{}"],
                      {"train": train, "val": val, "test": [Sample(f"val/c{c}/0.jpg", c) for c in range(3)]})
    picked = [f"/data/imagenet/images/train/c{c}/{i}.jpg" for c in range(3) for i in (0, 7)]  # 7: in fewclip's val
    path = tmp_path / "shot_2-seed_1.pkl"
    path.write_bytes(pickle.dumps({"train": [Datum(p, int(p.split("/c")[1][0])) for p in picked]}))
    cfg = OmegaConf.create({"shots": 2, "seed": 1, "fewshot": {"allow_fewer": False, "sampler": None,
                                                                "import": str(path)}})
    for rule in ("fewshot", "full"):
        proto = RunProtocol(name="reference", sampler="dassl", val=rule, views=1, support_features="augmented",
                            adapter=OmegaConf.create({}), import_path=str(path))
        fs = draw_fewshot(cfg, ds, proto, instantiate_node)
        assert fs.train == [p.split("imagenet/images/")[1] for p in picked]
        assert not set(fs.train) & set(fs.val) and fs.val
        assert len(fs.val) == (6 if rule == "fewshot" else 9 - 3)


def test_cli_refuses_reference_without_a_recipe_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fewclip", "run", "protocol=reference", "adapter=auto",
                           f"cache_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no reference recipe" in proc.stderr and "Traceback" not in proc.stderr
