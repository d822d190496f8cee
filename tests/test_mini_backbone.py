"""fewclip-mini on real images: the bundled weights load like a user's file and their features mean something.

Digits (shipped with scikit-learn) always run; Fashion-MNIST runs when Debian's ``dataset-fashion-mnist`` is
installed. Every threshold sits well inside the margin measured when it was set (the figures are in
``caches/model_configs/fewclip-mini.md``), and every failure message states the figures it saw.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from caches.backbone import FrozenClip
from caches.weights import bundled_weights
from fewclip.config import compose
from fewclip.demo import DEMO_SHORT
from fewclip.runner import run

pytestmark = pytest.mark.mini

WEIGHTS = Path(__file__).resolve().parents[1] / "caches" / "model_configs" / "fewclip-mini.safetensors"
FASHION = Path("/usr/share/datasets/fashion-mnist")
HAS_FASHION = any((FASHION / f"t10k-images-idx3-ubyte{s}").is_file() for s in ("", ".gz"))
DATASETS = ["digits", pytest.param("fashion_mnist", marks=pytest.mark.skipif(
    not HAS_FASHION, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"))]
# Trainable adapters that read cached features (the pixel-mode ones are checked in the slow test below).
TRAINED = ["lp_pp", "linear_probe", "clap", "tip_f", "ape_t", "clip_adapter", "taskres", "coop", "kgcoop", "cocoop"]
# Shorter schedules where the published one costs more than a few seconds on one CPU core (the claim checked, above
# zero-shot on val, does not need the full schedule); KgCoOp (100 epochs, ~4 s), CoCoOp (10 epochs, ~15 s) and
# CLIP-Adapter (200 epochs, ~3 s) run their published ones.
SHORT = {"coop": ["adapter.epochs=20"]}
PIXELS = DEMO_SHORT  # the demo's shorter schedules for the pixel-mode adapters
# Measured with the shipped weights (digits, 16 shots, seed 1, 40 val images: one image is 2.5 points; zero-shot val
# 27.50%), in the demo's table: CoCoOp, KgCoOp and MaPLe (2 epochs) 32.50%, DPT 35.00%, TaskRes 37.50%, CLAP 45.00%,
# CLIP-Adapter and CoOp on pixels 47.50%, CoOp 60.00%, the caches and probes 57.5-92.5%. CoCoOp at 2 epochs stayed
# below zero-shot on val (it ran 2 here before), so it runs its published 10. With the first fewclip-mini weights
# (7 epochs: a weaker text tower, logit scale 14.16) CoCoOp and MaPLe ended below zero-shot's val 17.50% (15.00% and
# 12.50%), and KgCoOp too while its knowledge weight was applied unscaled (see adapters/kgcoop.py). An adapter that
# falls to zero-shot or below on val fails here: put it in BELOW_ZS (adapter: (val %, strict)) with its figures.
BELOW_ZS: dict[str, tuple[float, bool]] = {}


def _below_zs(adapter: str) -> pytest.ParameterSet:
    if adapter not in BELOW_ZS:
        return pytest.param(adapter)
    val, strict = BELOW_ZS[adapter]
    return pytest.param(adapter, marks=pytest.mark.xfail(
        strict=strict, raises=AssertionError,
        reason=f"fewclip-mini digits: {adapter} val {val:.2f}% vs zero-shot val 27.50%"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mini_cache")


_RESULTS: dict[tuple, dict] = {}


def _run(cache: Path, tmp: Path, dataset: str, adapter: str, shots: int = 16, *extra: str) -> dict:
    key = (dataset, adapter, shots, extra)
    if key not in _RESULTS:
        cfg = compose([f"cache_dir={cache}", "progress=false", "device=cpu", "backbone=mini", f"dataset={dataset}",
                       f"adapter={adapter}", f"shots={shots}", *extra])
        _RESULTS[key] = run(cfg, out_dir=tmp / f"{dataset}-{adapter}-{shots}-{len(_RESULTS)}")
    return _RESULTS[key]


def test_mini_loads_through_the_local_file_path():
    assert WEIGHTS.is_file(), f"{WEIGHTS} is missing"
    size_mb = WEIGHTS.stat().st_size / 2**20
    assert size_mb <= 15, f"weights file is {size_mb:.1f} MiB"
    assert bundled_weights("fewclip-mini.safetensors") == str(WEIGHTS)
    from hydra.utils import instantiate

    backbone = instantiate(compose(["backbone=mini", "device=cpu"]).backbone)
    # Its zero-shot logits use the temperature it learned (exp of the file's logit_scale, 17.92), not CLIP's 100.
    from safetensors.torch import load_file

    learned = math.exp(float(load_file(str(WEIGHTS))["logit_scale"].double()))
    assert backbone.logit_scale == pytest.approx(learned, rel=1e-9) and 10 < learned < 20
    assert backbone.logit_scale_source == "learned"
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert backbone.weights_id == f"file-sha256:{digest[:16]}"
    assert backbone.describe()["pretrained"] == "fewclip-mini.safetensors"
    # Its own preprocessing: the config's image size with CLIP's mean/std (what it was trained with).
    assert backbone.image_spec.size == 48
    assert backbone.image_spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    # The same weights by an explicit path give the same features (one loading path, no special case).
    by_path = FrozenClip("fewclip-mini", str(WEIGHTS), device="cpu")
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(by_path.encode_images(x), backbone.encode_images(x))


@pytest.mark.parametrize("dataset", DATASETS)
def test_zero_shot_matches_an_independent_computation(cache, tmp_path, dataset):
    from hydra.utils import instantiate

    from caches.data.augment import eval_transform

    res = _run(cache, tmp_path, dataset, "zero_shot")
    cfg = compose(["backbone=mini", "device=cpu", f"dataset={dataset}"])
    backbone, ds = instantiate(cfg.backbone), instantiate(cfg.dataset)
    # Independent: encode the test images here, score them against the template-mean text head.
    tf = eval_transform(backbone.image_spec)
    test = ds.splits["test"]
    feats = torch.cat([backbone.encode_images(torch.stack([tf(ds.load_image(s)) for s in test[i:i + 512]]))
                       for i in range(0, len(test), 512)])
    text = backbone.encode_texts([t.format(c) for c in ds.classnames for t in ds.templates])
    head = torch.nn.functional.normalize(text.view(len(ds.classnames), len(ds.templates), -1).mean(1), dim=-1)
    labels = np.array([s.label for s in test])
    acc = float(((feats @ head.T).argmax(1).numpy() == labels).mean()) * 100
    assert res["test_acc"] == pytest.approx(acc, abs=0.4), (res["test_acc"], acc)


# Zero-shot above chance, by more than a few standard errors of a chance classifier: measured with the shipped
# weights, digits 24.68% (539 test images: the standard error at chance is 1.3 points) and Fashion-MNIST 13.76%
# (10,000 test images: 0.3 points; its class names barely occur in the training captions, see the model card).
# The first weights scored 9.90% on Fashion-MNIST, at chance: this margin fails on them.
ZS_MARGIN = {"digits": 5.0, "fashion_mnist": 2.0}


@pytest.mark.parametrize("dataset", DATASETS)
def test_zero_shot_beats_chance(cache, tmp_path, dataset):
    res = _run(cache, tmp_path, dataset, "zero_shot")
    chance = 100.0 / res["n_classes"]
    assert res["test_acc"] > chance + ZS_MARGIN[dataset], (
        f"{dataset}: zero-shot {res['test_acc']:.2f}% vs chance {chance:.1f}% (expected a margin above "
        f"{ZS_MARGIN[dataset]} points; measured: digits 24.68%, Fashion-MNIST 13.76%)")


# Measured at 16 shots, seed 1 (test %): digits zero-shot 24.68, Tip-Adapter 61.78 (alpha 54.6, beta 8.12 on the
# log grid); Fashion-MNIST 13.76 and 49.17. The margins are 37.1 and 35.4 points (539 digits test images: a standard
# error of about 2 points): 15 leaves room for noise and still fails if Tip falls back to zero-shot (it did, with the
# first weights, at 20.22%, with Tip-Adapter's photo augmentation on digits and ImageNet's beta < 7, alpha < 3 grid:
# see adapters/tip.py; with the fixes those weights gave 51.76 vs 20.04, and 49.5 and 48.6 on seeds 2 and 3).
TIP_MARGIN = 15.0


@pytest.mark.parametrize("dataset", DATASETS)
def test_tip_adapter_beats_zero_shot_at_16_shots(cache, tmp_path, dataset):
    zs = _run(cache, tmp_path, dataset, "zero_shot")
    tip = _run(cache, tmp_path, dataset, "tip")
    assert tip["test_acc"] > zs["test_acc"] + TIP_MARGIN, (
        f"{dataset}: Tip-Adapter {tip['test_acc']:.2f}% (hparams {tip['hparams']}) vs zero-shot "
        f"{zs['test_acc']:.2f}% at 16 shots; expected a margin above {TIP_MARGIN} points (measured: digits 61.78 vs "
        "24.68, Fashion-MNIST 49.17 vs 13.76)")


# Measured (test %, 1 -> 16 shots, seed 1): digits Tip 41.00 -> 61.78, GDA 33.02 -> 84.42, linear probe 42.30 -> 85.34;
# Fashion-MNIST Tip 30.24 -> 49.17, GDA 29.99 -> 62.12, linear probe 37.81 -> 62.00.
@pytest.mark.parametrize("dataset, adapter", [
    pytest.param(d, a, marks=m)
    for d, m in [("digits", []), ("fashion_mnist", DATASETS[1].marks)] for a in ["tip", "gda", "linear_probe"]])
def test_accuracy_grows_from_1_to_16_shots(cache, tmp_path, dataset, adapter):
    one = _run(cache, tmp_path, dataset, adapter, 1)
    sixteen = _run(cache, tmp_path, dataset, adapter, 16)
    assert sixteen["test_acc"] > one["test_acc"] + 5, (
        f"{dataset} {adapter}: {one['test_acc']:.2f}% at 1 shot, {sixteen['test_acc']:.2f}% at 16 shots")


@pytest.mark.parametrize("adapter", [_below_zs(a) for a in TRAINED])
def test_each_trainable_adapter_ends_above_zero_shot_on_val(cache, tmp_path, adapter):
    zs = _run(cache, tmp_path, "digits", "zero_shot")
    res = _run(cache, tmp_path, "digits", adapter, 16, *SHORT.get(adapter, []))
    assert res["val_acc"] > zs["val_acc"], (
        f"digits {adapter} {' '.join(SHORT.get(adapter, []))}: val {res['val_acc']:.2f}% vs zero-shot val "
        f"{zs['val_acc']:.2f}% (16 shots, {res['n_val']} val images)")


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [_below_zs(a) for a in sorted(PIXELS)])
def test_pixel_adapters_end_above_zero_shot_on_val(cache, tmp_path, adapter):
    zs = _run(cache, tmp_path, "digits", "zero_shot")
    res = _run(cache, tmp_path, "digits", adapter, 16, *PIXELS[adapter])
    assert res["val_acc"] > zs["val_acc"], (
        f"digits {adapter} ({', '.join(PIXELS[adapter])}): val {res['val_acc']:.2f}% vs zero-shot val "
        f"{zs['val_acc']:.2f}%")
