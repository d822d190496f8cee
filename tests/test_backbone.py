"""The frozen backbone: tiny model, normalised float32 outputs, text head, local weights, offline failure."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from caches.backbone import FrozenClip, WeightsUnavailableError, state_dict_hash


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


def test_missing_weights_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        FrozenClip("fewclip-tiny", "/nonexistent/weights.bin", device="cpu")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ValueError, match="Known tags"):
        FrozenClip("RN50-quickgelu", "no-such-tag", device="cpu")


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
