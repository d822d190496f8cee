"""Every YAML in every config group composes and instantiates; the typed spine rejects bad values."""

from __future__ import annotations

import shutil

import pytest
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate

from adapters.base import Adapter
from caches.backbone import FrozenClip
from caches.data.records import ImageDataset
from caches.weights import WeightsUnavailableError
from fewclip.config import compose, conf_dir, group_options

GROUPS = ("backbone", "dataset", "adapter")


def test_groups_are_directory_listings():
    for group in GROUPS:
        names = group_options(group)
        assert names == sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")) and names
    assert {"zero_shot", "tip"} <= set(group_options("adapter"))
    assert {"tiny", "rn50", "vit_b32", "vit_b16"} <= set(group_options("backbone"))


@pytest.mark.parametrize("name", group_options("adapter"))
def test_every_adapter_yaml_instantiates(name):
    cfg = compose([f"adapter={name}"])
    adapter = instantiate(cfg.adapter)
    assert isinstance(adapter, Adapter)
    assert adapter.input_kind in ("features", "pixels")
    # Methods live in adapters/; auto, which fits several of them, is the application's (fewclip/auto.py).
    assert cfg.adapter._target_.startswith("fewclip.auto." if name == "auto" else "adapters.")


def test_the_config_ships_with_the_package(tmp_path, monkeypatch):
    """conf/ is the package fewclip.conf; FEWCLIP_CONF replaces it, and a wrong FEWCLIP_CONF is named."""
    from importlib import resources
    from pathlib import Path

    monkeypatch.delenv("FEWCLIP_CONF", raising=False)
    assert conf_dir() == Path(str(resources.files("fewclip.conf")))
    repo_conf = Path(__file__).resolve().parents[1] / "conf"
    assert sorted(p.relative_to(conf_dir()) for p in conf_dir().rglob("*.yaml")) == \
        sorted(p.relative_to(repo_conf) for p in repo_conf.rglob("*.yaml"))

    copy = tmp_path / "conf"
    shutil.copytree(conf_dir(), copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    text = (copy / "config.yaml").read_text()
    assert "\nshots: 16\n" in text and compose([]).shots == 16
    (copy / "config.yaml").write_text(text.replace("\nshots: 16\n", "\nshots: 3\n"))
    monkeypatch.setenv("FEWCLIP_CONF", str(copy))
    assert conf_dir() == copy and compose([]).shots == 3
    monkeypatch.setenv("FEWCLIP_CONF", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="FEWCLIP_CONF"):
        conf_dir()


@pytest.fixture(scope="module")
def every_layout(tmp_path_factory):
    """A generated mini-copy of every dataset layout, and the overrides that point each config at it."""
    from conftest import make_class_folder
    from layouts import make_all, make_imagenet_targets

    root = tmp_path_factory.mktemp("layouts")
    extra = make_all(root)
    make_imagenet_targets(root)
    folder = make_class_folder(root / "folder", {"a": 5, "b": 5})
    extra["folder"] = [f"dataset.root={folder}"]
    return root, extra


@pytest.mark.parametrize("name", group_options("dataset"))
def test_every_dataset_yaml_instantiates(name, every_layout):
    root, extra = every_layout
    cfg = compose([f"dataset={name}", f"data_root={root}", *extra.get(name, [])])
    ds = instantiate(cfg.dataset)
    assert isinstance(ds, ImageDataset) and ds.n_classes >= 2 and cfg.dataset.name == ds.name
    assert len(ds.splits["test"]) > 0


@pytest.mark.parametrize("name", group_options("backbone"))
def test_every_backbone_yaml_instantiates(name):
    extra = ["backbone.model=fewclip-tiny", "backbone.name=tiny2"] if name == "open_clip" else []
    cfg = compose([f"backbone={name}", "device=cpu", *extra])
    try:
        bb = instantiate(cfg.backbone)
    except InstantiationException as e:
        # Real weights are not reachable offline: that must be the clear weights error, nothing else.
        assert isinstance(e.__cause__, WeightsUnavailableError), e
        assert cfg.backbone.pretrained == "openai"
        return
    assert isinstance(bb, FrozenClip) and bb.name == cfg.backbone.name


def test_typed_spine_rejects_bad_values():
    with pytest.raises(ConfigCompositionException):
        compose(["shots=abc"])
    with pytest.raises(ConfigCompositionException):
        compose(["views=1.5"])
    cfg = compose(["shots=4", "seed=3", "cache_dir=/tmp/x"])
    assert (cfg.shots, cfg.seed, cfg.cache_dir) == (4, 3, "/tmp/x")


def test_cache_dir_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("FEWCLIP_CACHE_DIR", "/some/shared/cache")
    assert compose([]).cache_dir == "/some/shared/cache"
    monkeypatch.delenv("FEWCLIP_CACHE_DIR")
    assert compose([]).cache_dir == ".fewclip_cache"


def test_unknown_option_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["adapter=nope"])
    msg = str(err.value)
    assert "Available options" in msg and "tip" in msg and "zero_shot" in msg
