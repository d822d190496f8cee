"""Artifacts: fewclip fit / predict / add-class and the Python API, checked against independent computations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_class_folder

from caches.store import KVStore
from fewclip.artifact import (
    AddClassError,
    ArtifactError,
    BackboneMismatchError,
    add_class_main,
    fit,
    fit_main,
    load_artifact,
    predict_main,
)

CLASSES = {"red_fox": 10, "blue_jay": 10, "green_tree": 10}
TIP_FIXED = {"adapter__search": False, "adapter__alpha": 20.0, "adapter__beta": 5.0}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    make_class_folder(root / "imgs", CLASSES)
    # The same images without the third class, which add-class then brings in.
    make_class_folder(root / "two", {k: v for k, v in CLASSES.items() if k != "green_tree"})
    return root


def _fit(work: Path, out: str, adapter: str, dataset: str = "imgs", **kw):
    common = {"views": 2, "cache_dir": str(work / "cache"), "progress": False, "seed": 1}
    return fit(dataset=str(work / dataset), adapter=adapter, backbone="tiny", shots=2, out=work / out, device="cpu",
               **{**common, **kw})


@pytest.fixture(scope="module")
def tip_art(work):
    return _fit(work, "tip", "tip", adapter__beta_steps=10, adapter__alpha_steps=5)


def _test_split(art_path: Path, root: Path):
    """The runner's test store of the fitted run, and the image paths of its rows."""
    res = json.loads((art_path / "result.json").read_text())
    store = KVStore.load(res["cache"]["test"]["path"], res["cache"]["test"]["fingerprint"])
    return store, [str(root / r["id"]) for r in store.meta], res


def _tip_probs(art_path: Path, x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Tip-Adapter by the paper's formula from the artifact's own stores, softmaxed: ``[B, D] -> [B, C]``."""
    text = KVStore.load(art_path / "text").keys()
    support = KVStore.load(art_path / "support")
    keys, values = support.keys(), support.labels()
    cache = torch.exp(-beta * (1 - x @ keys.t())) @ F.one_hot(values, len(text)).float()
    return (100 * x @ text.t() + alpha * cache).softmax(dim=-1)


def test_fit_writes_a_complete_self_contained_artifact(work, tip_art):
    path = work / "tip"
    assert {p.name for p in path.iterdir()} == {"artifact.json", "config.yaml", "result.json", "text", "support"}
    assert {p.name for p in (path / "text").iterdir()} == {"manifest.json", "keys.faiss", "values.npy", "meta.csv"}
    assert {p.name for p in (path / "support").iterdir()} == {"manifest.json", "keys.faiss", "values.npy",
                                                              "views.npy", "meta.csv"}
    info = json.loads((path / "artifact.json").read_text())
    res = json.loads((path / "result.json").read_text())
    assert info["classnames"] == ["blue jay", "green tree", "red fox"] == tip_art.classnames
    assert info["templates"] == ["a photo of a {}."]
    assert info["adapter"]["name"] == "tip" and info["adapter"]["input_kind"] == "features"
    assert info["adapter"]["hparams"] == res["hparams"] and info["adapter"]["state"] is None
    assert info["backbone"]["model"] == "fewclip-tiny" and info["backbone"]["weights_id"].startswith("random:")
    assert info["preprocessing"]["size"] == 32 and len(info["preprocessing"]["mean"]) == 3
    assert info["fit"]["val_acc"] == res["val_acc"] and info["fit"]["test_acc"] == res["test_acc"]
    assert info["fit"]["selection"] == "val"
    assert set(info["fit"]["store_fingerprints"]) == {"text", "support", "val", "test"}
    assert info["stores"]["support"]["n"] == 6 and info["views"] == 2
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(OmegaConf.load(path / "config.yaml")) == res["config"]
    # written through a temporary sibling: nothing left beside it
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []


def test_predict_equals_the_tip_formula_on_the_runners_test_features(work, tip_art, tiny):
    store, paths, res = _test_split(work / "tip", work / "imgs")
    art = load_artifact(work / "tip", backbone=tiny)
    got = art.predict(paths, batch_size=7)  # batches other than the cache builder's
    hp = res["hparams"]
    expected = _tip_probs(work / "tip", store.keys(), hp["alpha"], hp["beta"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    acc = float((got.argmax(1) == store.labels()).float().mean()) * 100
    assert acc == pytest.approx(res["test_acc"])
    # a preprocessed tensor gives the same probabilities
    from PIL import Image

    from caches.data.augment import eval_transform

    tf = eval_transform(tiny.image_spec)
    pixels = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[:4]])
    torch.testing.assert_close(art.predict(pixels), got[:4], rtol=1e-5, atol=1e-6)
    with pytest.raises(ArtifactError, match="preprocessed pixels"):
        art.predict(torch.zeros(2, 3, 8, 8))


def test_predict_cli_csv_equals_the_api_and_reports_unreadable_images(work, tip_art, tiny, capsys):
    _, paths, _ = _test_split(work / "tip", work / "imgs")
    folder = work / "to_predict"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not an image")
    listing = work / "list.csv"
    listing.write_text("path,note\n" + "".join(f"{p},x\n" for p in paths[:3]))  # absolute paths
    out = work / "preds.csv"
    rc = predict_main([str(work / "tip"), str(folder), str(listing), *paths[3:6], "--out", str(out), "--topk", "2",
                       "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "6 of 7 images predicted" in err and "broken.png" in err
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == [str(folder / "broken.png"), *paths[:6]]
    assert rows[0]["status"].startswith("unreadable:") and rows[0]["prediction"] == ""
    api = load_artifact(work / "tip", backbone=tiny)
    probs = api.predict(paths[:6])
    for row, p in zip(rows[1:], probs):
        assert row["status"] == "ok"
        assert row["prediction"] == api.classnames[int(p.argmax())] == row["top1_class"]
        assert float(row["probability"]) == pytest.approx(float(p.max()), abs=2e-6)
        second = p.topk(2).indices[1]
        assert row["top2_class"] == api.classnames[int(second)]
        assert float(row["top2_prob"]) == pytest.approx(float(p[second]), abs=2e-6)
    # the API reports unreadable images too: as an error from predict, as a NaN row from predict_files
    with pytest.raises(ArtifactError, match="could not be read"):
        api.predict([str(folder / "broken.png"), paths[0]])
    files = api.predict_files([str(folder / "broken.png"), paths[0]])
    assert torch.isnan(files.probs[0]).all()
    torch.testing.assert_close(files.probs[1], probs[0], rtol=1e-5, atol=1e-6)
    assert files.unreadable[0][0] == str(folder / "broken.png")


def test_bad_input_exits_2_with_one_line(work, tip_art, capsys):
    assert predict_main([str(work / "missing"), str(work / "imgs")]) == 2
    assert predict_main([str(work / "tip"), str(work / "nothing_here")]) == 2
    (work / "empty").mkdir()
    assert predict_main([str(work / "tip"), str(work / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "does not exist" in err[0] and "no such file" in err[1] and "no images" in err[2]


def test_a_backbone_with_other_weights_is_refused(work, tip_art, tmp_path, capsys):
    from safetensors.torch import save_file

    from caches.backbone import FrozenClip

    other = FrozenClip("fewclip-tiny", None, seed=1, device="cpu")
    with pytest.raises(BackboneMismatchError, match="weights_id: artifact 'random:"):
        load_artifact(work / "tip", backbone=other)
    # the CLI with a weights file of the same architecture: refused, exit 2, one line naming what differs
    weights = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(weights))
    rc = predict_main([str(work / "tip"), str(work / "imgs" / "red_fox"), "--pretrained", str(weights),
                       "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights_id" in err[0] and "file-sha256:" in err[0] and "model:" not in err[0]


def _edited_copy(work: Path, tmp_path: Path, edit, redigest: bool, version: int | None = None) -> Path:
    """A copy of the tip artifact whose artifact.json went through ``edit`` (digest recomputed or not)."""
    import shutil

    from fewclip.artifact.format import info_digest

    copy = tmp_path / "edited"
    shutil.copytree(work / "tip", copy)
    info = json.loads((copy / "artifact.json").read_text())
    edit(info)
    if version is not None:  # as a format-1 artifact (written before artifact.json carried a digest)
        info["format_version"] = version
        info.pop("digest")
    elif redigest:
        info["digest"] = info_digest(info)
    (copy / "artifact.json").write_text(json.dumps(info, indent=2))
    return copy


def _swap_first_two_classes(info):
    info["classnames"][0], info["classnames"][1] = info["classnames"][1], info["classnames"][0]


@pytest.mark.parametrize("redigest,version,message", [
    (False, None, "artifact.json was edited or is corrupt"),
    (True, None, "classnames does not match the text store .at position 0: 'green tree' here, 'blue jay' there"),
    (False, 1, "classnames does not match the text store"),
])
def test_swapped_class_names_in_artifact_json_are_refused(work, tip_art, tmp_path, capsys, redigest, version,
                                                          message):
    """Swapping two class names would relabel every prediction: refused on load, and by the CLI (exit 2)."""
    copy = _edited_copy(work, tmp_path, _swap_first_two_classes, redigest, version)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(copy, device="cpu")
    assert predict_main([str(copy), str(work / "imgs" / "red_fox"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]


@pytest.mark.parametrize("field,edit", [
    ("adapter.hparams", lambda i: i["adapter"]["hparams"].update(alpha=i["adapter"]["hparams"]["alpha"] + 1)),
    ("templates", lambda i: i["templates"].append("a drawing of a {}.")),
    ("backbone", lambda i: i["backbone"].update(dim=i["backbone"]["dim"] * 2)),
    ("shots", lambda i: i.update(shots=i["shots"] + 1)),
    ("fit.test_acc", lambda i: i["fit"].update(test_acc=i["fit"]["test_acc"] + 1.0)),
    ("stores.support.n", lambda i: i["stores"]["support"].update(n=i["stores"]["support"]["n"] - 1)),
])
def test_fields_repeating_a_verified_file_are_cross_checked(work, tip_art, tmp_path, field, edit):
    copy = _edited_copy(work, tmp_path, edit, redigest=True)
    with pytest.raises(ArtifactError, match=f"{field} does not match"):
        load_artifact(copy, device="cpu")


def test_an_unedited_format_1_artifact_still_loads(work, tip_art, tmp_path):
    copy = _edited_copy(work, tmp_path, lambda info: None, redigest=False, version=1)
    assert load_artifact(copy, device="cpu").classnames == tip_art.classnames


def test_add_class_to_tip_appends_keys_from_the_support_recipe_and_the_formula_holds(work, tiny):
    art = _fit(work, "tip_two", "tip", dataset="two", **TIP_FIXED)
    assert art.classnames == ["blue jay", "red fox"]
    hp = dict(art.adapter.hparams())
    shots = sorted((work / "imgs" / "green_tree").glob("*.png"))
    record = art.add_class("green tree", [str(p) for p in shots[:3]])
    assert record["n_images"] == 3 and record["unreadable"] == [] and "cache keys" in record["how"]
    assert art.classnames == ["blue jay", "red fox", "green tree"] and art.adapter.hparams() == hp

    path = work / "tip_two"
    support = KVStore.load(path / "support")
    new = [i for i, r in enumerate(support.meta) if r["classname"] == "green tree"]
    assert len(new) == 3 and support.labels()[new].tolist() == [2, 2, 2]
    # the new keys, recomputed from the images with the support store's recipe: A seeded augmented views per
    # image (view v of image id uses view_generator(0, v, id)), encoded, averaged, renormalised
    from PIL import Image

    from caches.data.augment import AugmentSpec, augmented_view, view_generator

    aug = AugmentSpec(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in support.manifest["spec"]["augmentation"].items() if k != "kind"})
    for row, shot in zip(new, shots[:3]):
        sid = support.meta[row]["id"]
        assert sid.endswith(shot.name)
        img = Image.open(shot).convert("RGB")
        views = torch.stack([augmented_view(img, tiny.image_spec, aug, view_generator(0, v, sid)) for v in range(2)])
        key = F.normalize(tiny.encode_images(views).mean(dim=0), dim=-1)
        torch.testing.assert_close(support.keys()[row], key, rtol=1e-4, atol=1e-5)
    text = KVStore.load(path / "text")
    torch.testing.assert_close(text.keys()[2], tiny.text_head(["green tree"], ["a photo of a {}."])[0])

    # reloaded from disk: same classes, the new class predicted by the formula with the appended keys
    again = load_artifact(path, backbone=tiny)
    assert again.classnames == art.classnames
    queries = [str(p) for p in shots[3:]]
    got = again.predict(queries)
    torch.testing.assert_close(got, art.predict(queries))
    x = tiny.encode_images(torch.stack([again.transform(Image.open(q).convert("RGB")) for q in queries]))
    torch.testing.assert_close(got, _tip_probs(path, x, hp["alpha"], hp["beta"]), rtol=1e-4, atol=1e-5)
    assert (got.argmax(1) == 2).float().mean() >= 0.8  # the green images now go to the green class
    info = json.loads((path / "artifact.json").read_text())
    assert info["added_classes"][0]["classname"] == "green tree" and info["adapter"]["hparams"] == hp

    with pytest.raises(AddClassError, match="already a class"):
        again.add_class("green tree", queries)
    with pytest.raises(AddClassError, match="at least one"):
        again.add_class("violet", [])


def test_add_class_to_zero_shot_by_the_cli_adds_the_text_row(work, tiny, capsys):
    _fit(work, "zs_two", "zero_shot", dataset="two")
    path = work / "zs_two"
    assert add_class_main([str(path), "green tree", "--no-progress"]) == 0
    assert "text-head row" in capsys.readouterr().out
    art = load_artifact(path, backbone=tiny)
    assert art.classnames == ["blue jay", "red fox", "green tree"]
    queries = [str(p) for p in sorted((work / "imgs" / "green_tree").glob("*.png"))]
    from PIL import Image

    x = tiny.encode_images(torch.stack([art.transform(Image.open(q).convert("RGB")) for q in queries]))
    head = torch.cat([KVStore.load(path / "text").keys()[:2], tiny.text_head(["green tree"], ["a photo of a {}."])])
    torch.testing.assert_close(art.predict(queries), (100 * x @ head.t()).softmax(-1), rtol=1e-4, atol=1e-5)
    assert KVStore.load(path / "support").manifest["n"] == 4  # zero-shot needs no shots: the cache is unchanged


def test_adapters_with_per_class_learned_parameters_refuse_a_new_class(work, tiny, capsys):
    art = _fit(work, "lp_two", "linear_probe", dataset="two", **{"adapter.c_grid": [1.0]})
    before = (work / "lp_two" / "artifact.json").read_bytes()
    img = str(next((work / "imgs" / "green_tree").glob("*.png")))
    refusal = r"adapter=linear_probe \(LinearProbe\) cannot take a new class without refitting: its weight row"
    with pytest.raises(AddClassError, match=refusal):
        art.add_class("green tree", [img])
    assert add_class_main([str(work / "lp_two"), "green tree", img, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refit" in err[0]
    assert (work / "lp_two" / "artifact.json").read_bytes() == before  # untouched


ADD_CLASS = {"zero_shot": "text", "tip": "images", "gda": "images", "ape": "images", "coop": "state",
             "cocoop": "state", "kgcoop": "state", "clip_adapter": "state", "coop_pixels": "state", "maple": "state",
             "dpt": "state"}


@pytest.mark.parametrize("name", ["zero_shot", "tip", "tip_f", "gda", "ape", "ape_t", "clip_adapter", "linear_probe",
                                  "lp_pp", "clap", "taskres", "coop", "cocoop", "kgcoop", "coop_pixels", "maple", "dpt",
                                  "auto", "coop_csc"])
def test_which_adapters_take_a_new_class(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fewclip.artifact import add_class_rule
    from fewclip.config import conf_dir

    node = OmegaConf.load(conf_dir() / "adapter" / f"{name.replace('_csc', '')}.yaml")
    if name == "coop_csc":
        node.csc = True
    adapter = instantiate(node)
    if name not in ADD_CLASS:
        with pytest.raises(AddClassError, match="cannot take a new class without refitting: .+ Fit again"):
            add_class_rule(adapter, name)
        return
    rule = add_class_rule(adapter, name)
    assert (rule.uses_images, rule.carries_state) == {"text": (False, False), "images": (True, False),
                                                      "state": (False, True)}[ADD_CLASS[name]]


def test_trained_class_agnostic_adapter_keeps_its_state_through_export_and_add_class(work, tiny):
    art = _fit(work, "ca", "clip_adapter", adapter__epochs=2)
    path = work / "ca"
    assert (path / "adapter.safetensors").is_file()
    store, paths, res = _test_split(path, work / "imgs")
    probs = load_artifact(path, backbone=tiny).predict(paths)
    assert float((probs.argmax(1) == store.labels()).float().mean()) * 100 == pytest.approx(res["test_acc"])
    # the MLP acts on image features: the new class is scored from its name with the same learned state
    record = art.add_class("violet flower")
    assert "class-independent" in record["how"] and record["n_images"] == 0
    again = load_artifact(path, backbone=tiny)
    assert again.classnames[-1] == "violet flower"
    torch.testing.assert_close(again.predict(paths)[:, :3].argmax(1), probs.argmax(1))
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(str(path / "adapter.safetensors"))["mlp.0.weight"],
                               art.adapter.state_dict()["mlp.0.weight"].cpu())


def test_gda_add_class_recomputes_the_closed_form(work, tiny):
    from adapters.gda import gda_classifier, support_samples

    art = _fit(work, "gda_two", "gda", dataset="two")
    shots = sorted((work / "imgs" / "green_tree").glob("*.png"))
    art.add_class("green tree", [str(p) for p in shots[:2]])
    again = load_artifact(work / "gda_two", backbone=tiny)
    support = KVStore.load(work / "gda_two" / "support")
    from adapters.base import SupportSet

    x, y = support_samples(SupportSet(support.keys(), support.labels(), support.view_features()))
    w, b = gda_classifier(x, y, 3)
    torch.testing.assert_close(again.adapter.weight, w)
    torch.testing.assert_close(again.adapter.bias, b)


def test_pixel_mode_artifact_predicts_from_pixels(work, tiny):
    _fit(work, "coop_px", "coop_pixels", adapter__epochs=1, adapter__batch_size=4)
    res = json.loads((work / "coop_px" / "result.json").read_text())
    art = load_artifact(work / "coop_px", backbone=tiny)
    assert art.adapter.input_kind == "pixels"
    # the runner evaluated on pixels of the test split: recompute the same accuracy from the files
    from caches.data.datasets import load_folder

    ds = load_folder(str(work / "imgs"), ["a photo of a {}."])
    test = ds.splits["test"]
    probs = art.predict([s.path for s in test])
    labels = torch.tensor([s.label for s in test])
    assert float((probs.argmax(1) == labels).float().mean()) * 100 == pytest.approx(res["test_acc"])


def test_artifacts_hold_no_pickles(work, tip_art):
    import faiss
    import yaml
    from safetensors.torch import load_file

    artifacts = [p for p in work.iterdir() if (p / "artifact.json").is_file()]
    assert artifacts
    allowed = {".json", ".yaml", ".csv", ".npy", ".faiss", ".safetensors"}
    for f in (f for a in artifacts for f in a.rglob("*") if f.is_file()):
        assert f.suffix in allowed, f
        assert not f.read_bytes()[:2].startswith(b"\x80"), f  # a pickle stream starts with PROTO
        if f.suffix == ".npy":
            assert np.load(f, allow_pickle=False).dtype != object
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".yaml":
            yaml.safe_load(f.read_text())
        elif f.suffix == ".safetensors":
            load_file(str(f))
        elif f.suffix == ".faiss":
            faiss.read_index(str(f))


def test_fit_cli_refuses_a_foreign_folder_and_replaces_an_artifact(work, capsys):
    foreign = work / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    common = [f"dataset.root={work / 'two'}", "dataset=folder", "adapter=zero_shot", "shots=1", "views=1",
              f"cache_dir={work / 'cache'}", "progress=false", "device=cpu"]
    assert fit_main([*common, f"out={foreign}"]) == 2
    assert "not a fewclip artifact" in capsys.readouterr().err and (foreign / "notes.txt").is_file()
    out = work / "zs_cli"
    assert fit_main([*common, f"out={out}"]) == 0
    first = json.loads((out / "artifact.json").read_text())["created_at"]
    assert "artifact:" in capsys.readouterr().out
    assert fit_main([*common, "--out", str(out)]) == 0  # an artifact is replaced in place
    assert json.loads((out / "artifact.json").read_text())["created_at"] >= first
    assert not [p for p in work.iterdir() if p.name.startswith(".zs_cli")]
    assert fit_main([*common, "adapter=nope", f"out={work / 'x'}"]) == 2


def test_python_api_package():
    import fewclip as api
    import fewclip.artifact as artifact

    assert api.fit is artifact.fit and api.load_artifact is artifact.load_artifact and api.Artifact is artifact.Artifact
    fewclip = pytest.importorskip("fewclip", reason="the fewclip package mapping needs 'pip install -e .' again")
    assert fewclip.load_artifact is artifact.load_artifact and fewclip.fit is artifact.fit
