"""The frozen backbone: tiny model, normalised float32 outputs, text head, local weights, offline failure."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import caches.backbone
import caches.weights
from caches.backbone import FrozenClip
from caches.weights import BackboneConfigError, WeightsUnavailableError, state_dict_hash


def test_tiny_is_the_same_model_every_time(tiny):
    again = FrozenClip("fewclip-tiny", None, name="tiny", device="cpu")
    assert state_dict_hash(again.model) == state_dict_hash(tiny.model)
    other_seed = FrozenClip("fewclip-tiny", None, name="tiny", seed=1, device="cpu")
    assert state_dict_hash(other_seed.model) != state_dict_hash(tiny.model)


def test_building_the_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    FrozenClip("fewclip-tiny", None, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_encode_images_normalised_float32(tiny):
    x = torch.randn(5, 3, tiny.image_spec.size, tiny.image_spec.size, generator=torch.Generator().manual_seed(0))
    f = tiny.encode_images(x)
    assert f.shape == (5, tiny.dim) and f.dtype == torch.float32
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(5))
    raw = tiny.model.encode_image(x).detach()
    torch.testing.assert_close(f, raw / raw.norm(dim=-1, keepdim=True))


def test_text_head_is_renormalised_template_mean(tiny):
    classes, templates = ["cat", "dog", "red fox"], ["a photo of a {}.", "art of the {}.", "{}"]
    head = tiny.text_head(classes, templates)
    rows = []
    for c in classes:
        e = tiny.model.encode_text(tiny.tokenizer([t.format(c) for t in templates])).detach()
        e = e / e.norm(dim=-1, keepdim=True)
        m = e.mean(0)
        rows.append(m / m.norm())
    torch.testing.assert_close(head, torch.stack(rows), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must contain"):
        tiny.text_head(classes, ["no placeholder"])


def test_local_weights_file_loads_exactly(tmp_path, tiny):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    # A different seed proves the weights come from the file, not from the initialisation.
    loaded = FrozenClip("fewclip-tiny", str(path), name="tiny-file", seed=99, device="cpu")
    assert state_dict_hash(loaded.model) == state_dict_hash(tiny.model)
    assert loaded.weights_id.startswith("file-sha256:")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.encode_images(x), tiny.encode_images(x))


@pytest.mark.parametrize("stored, expected", [(math.log(20.0), 20.0), (4.6052, 100.0), (math.log(1 / 0.07), 1 / 0.07)])
def test_logit_scale_is_the_weights_learned_temperature(tmp_path, tiny, stored, expected):
    """Zero-shot logits use exp(logit_scale) of the weights, clamped at CLIP's 100 (OpenAI stores 4.6052, just
    above ln 100); random weights have learned nothing and get 100; backbone.logit_scale overrides."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    state["logit_scale"] = torch.tensor(stored)
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = FrozenClip("fewclip-tiny", str(tmp_path / "w.safetensors"), device="cpu")
    assert loaded.logit_scale == pytest.approx(expected, rel=1e-6) and loaded.logit_scale_source == "learned"
    assert loaded.logit_scale <= 100.0
    assert (tiny.logit_scale, tiny.logit_scale_source) == (100.0, "fixed")  # random init: ln(1/0.07) is no lesson
    given = FrozenClip("fewclip-tiny", str(tmp_path / "w.safetensors"), device="cpu", logit_scale=50.0)
    assert (given.logit_scale, given.logit_scale_source) == (50.0, "set")
    with pytest.raises(ValueError, match="logit_scale must be > 0"):
        FrozenClip("fewclip-tiny", None, device="cpu", logit_scale=0.0)


def test_missing_weights_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        FrozenClip("fewclip-tiny", "/nonexistent/weights.bin", device="cpu")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(BackboneConfigError, match="Known tags: openai, yfcc15m"):
        FrozenClip("RN50-quickgelu", "no-such-tag", device="cpu")
    # A GELU-only tag asked of the -quickgelu twin names the model that has it.
    with pytest.raises(BackboneConfigError, match="ViT-B-32 \\(GELU\\) has the tag laion2b_s34b_b79k"):
        FrozenClip("ViT-B-32-quickgelu", "laion2b_s34b_b79k", device="cpu")


def test_unknown_model_names_close_matches():
    with pytest.raises(BackboneConfigError, match="close matches: ViT-B-32"):
        FrozenClip("ViT-B-32x", "openai", device="cpu")


def _save_tiny(tiny, path: Path, drop: str | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items() if k != drop}, str(path))
    return path


def _tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "my-clip"
    folder.mkdir()
    cfg = json.loads((Path(caches.backbone.__file__).parent / "model_configs" / "fewclip-tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return folder


def test_local_dir_without_weights_is_refused_not_random(tmp_path, tiny):
    folder = _tiny_folder(tmp_path)
    with pytest.raises(WeightsUnavailableError, match="config but no weights.*random"):
        FrozenClip(f"local-dir:{folder}", device="cpu")
    # With the checkpoint beside the config, the folder's weights are the ones loaded (another seed would differ).
    _save_tiny(tiny, folder / "open_clip_model.safetensors")
    loaded = FrozenClip(f"local-dir:{folder}", seed=99, device="cpu")
    assert state_dict_hash(loaded.model) == state_dict_hash(tiny.model)
    assert loaded.name == "my-clip" and loaded.weights_id.startswith("local-dir-sha256:")


def test_weights_of_another_architecture_are_one_clear_error(tmp_path, tiny):
    path = _save_tiny(tiny, tmp_path / "partial.safetensors", drop="ln_final.weight")
    with pytest.raises(BackboneConfigError, match="does not fit.*1 missing \\(e.g. ln_final.weight\\)"):
        FrozenClip("fewclip-tiny", str(path), device="cpu")


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning", "ignore:.*TorchScript archive:UserWarning")
def test_torchscript_checkpoint_loads_like_openai_releases(tmp_path, tiny):
    # OpenAI's original .pt files are TorchScript archives, which torch.load refuses under weights_only.
    path = tmp_path / "tiny-jit.pt"
    torch.jit.script(copy.deepcopy(tiny.model)).save(str(path))
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.load(path, weights_only=True)
    loaded = FrozenClip("fewclip-tiny", str(path), seed=99, device="cpu")
    assert state_dict_hash(loaded.model) == state_dict_hash(tiny.model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded.encode_images(x), tiny.encode_images(x))
    assert loaded.weights_id.startswith("file-sha256:")


@pytest.fixture
def quickgelu_tag(monkeypatch, tmp_path, tiny):
    """A pretrained tag of the tiny model trained with QuickGELU (as OpenAI's), its weights in a local file."""
    import open_clip.factory
    import open_clip.pretrained

    weights = _save_tiny(tiny, tmp_path / "tiny.safetensors")
    tag = {"hf_hub": "fewclip/tiny-test/", "quick_gelu": True}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "fewclip-tiny", {"qgtest": tag})
    monkeypatch.setattr(caches.weights, "_cached_hub_file", lambda hub, cache_dir: str(weights))
    return tag


def _activation(backbone) -> type:
    return type(backbone.model.visual.transformer.resblocks[0].mlp.gelu)


def test_quickgelu_tag_builds_a_quickgelu_model(quickgelu_tag, tiny, caplog, monkeypatch):
    from open_clip.transformer import QuickGELU

    assert _activation(tiny) is torch.nn.GELU
    # No -quickgelu twin of the architecture: built with force_quick_gelu, and the fingerprint says so.
    with caplog.at_level("WARNING", logger="caches.backbone"):
        bb = FrozenClip("fewclip-tiny", "qgtest", device="cpu")
    assert _activation(bb) is QuickGELU and bb.describe()["force_quick_gelu"] is True
    assert "trained with QuickGELU" in caplog.text
    # With a twin (as ViT-B-32 has ViT-B-32-quickgelu), the twin is built.
    import open_clip.factory
    import open_clip.pretrained

    cfg = {**open_clip.factory._MODEL_CONFIGS["fewclip-tiny"], "quick_gelu": True}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "fewclip-tiny-quickgelu", cfg)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "fewclip-tiny-quickgelu", {"qgtest": quickgelu_tag})
    twin = FrozenClip("fewclip-tiny", "qgtest", device="cpu")
    assert twin.model_name == "fewclip-tiny-quickgelu" and _activation(twin) is QuickGELU
    assert "force_quick_gelu" not in twin.describe()
    # A QuickGELU architecture asked for a GELU tag is refused.
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "fewclip-tiny-quickgelu",
                        {"geltag": {**quickgelu_tag, "quick_gelu": False}})
    with pytest.raises(BackboneConfigError, match="trained with GELU"):
        FrozenClip("fewclip-tiny-quickgelu", "geltag", device="cpu")


def test_vit_b32_with_the_openai_tag_is_switched_to_quickgelu():
    # The real case, decided before any weights are fetched: the tag lives under the -quickgelu name.
    from caches.weights import match_activation

    assert match_activation("ViT-B-32", "openai") == ("ViT-B-32-quickgelu", False)
    assert match_activation("ViT-B-32-quickgelu", "openai") == ("ViT-B-32-quickgelu", False)
    assert match_activation("ViT-B-32", "laion2b_s34b_b79k") == ("ViT-B-32", False)


def test_unfetchable_weights_fail_fast_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        FrozenClip("ViT-B-16-quickgelu", "openai", device="cpu", weights_cache_dir=str(tmp_path / "hf"))
    assert time.perf_counter() - t < 10
    msg = str(err.value)
    assert "backbone.pretrained=" in msg and "backbone=mini" in msg and "local-dir:" in msg


def test_tiny_features_depend_on_the_image(tiny):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 1, 3, 32, 32, generator=g)
    fa, fb = tiny.encode_images(a), tiny.encode_images(b)
    assert not torch.allclose(fa, fb)
    assert float(F.cosine_similarity(fa, tiny.encode_images(a.clone()))) == pytest.approx(1.0, abs=1e-6)
