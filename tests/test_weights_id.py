"""Weights identity: OpenAI's released files recognised by their sha256, Hugging Face snapshots recorded by revision
and file hash, and the raw text norms the text head keeps."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest
import torch

import caches.weights_id as wid
from caches.backbone import FrozenClip


def test_openai_table_matches_the_download_urls_open_clip_lists():
    """The table's hashes are the ones OpenAI's URLs embed: cross-checked with the installed open_clip."""
    import open_clip

    releases = wid.openai_releases()
    assert len(releases) == 9 and {r["name"] for r in releases.values()} >= {"RN50", "ViT-B/16", "ViT-B/32"}
    checked = 0
    for sha, rel in releases.items():
        assert rel["url"].split("/")[-2] == sha and rel["url"].endswith("/" + rel["file"])
        cfg = open_clip.get_pretrained_cfg(rel["open_clip_model"], "openai")
        if cfg.get("url"):
            assert cfg["url"] == rel["url"], rel["name"]
            checked += 1
    assert checked >= 1 or pytest.skip("this open_clip lists no OpenAI URLs")


def test_a_local_copy_of_an_openai_release_is_recognised(tmp_path, monkeypatch, caplog):
    path = tmp_path / "RN50.pt"
    path.write_bytes(b"pretend these are OpenAI's weights")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    fake = {sha: {"name": "RN50", "file": "RN50.pt", "url": "u", "open_clip_model": "RN50-quickgelu", "sha256": sha}}
    monkeypatch.setattr(wid, "openai_releases", lambda: fake)
    weights_id, info = wid.file_identity(str(path), None, "RN50-quickgelu")
    assert weights_id == f"openai:{sha[:16]}" and wid.is_openai(weights_id) and info["openai_release"] == "RN50"
    assert info["sha256"] == sha
    with caplog.at_level(logging.WARNING):
        wid.file_identity(str(path), None, "ViT-B-16-quickgelu")  # an RN50 file named as another architecture
    assert "RN50-quickgelu" in caplog.text
    other = tmp_path / "mine.bin"
    other.write_bytes(b"fine-tuned elsewhere")
    weights_id, info = wid.file_identity(str(other), None, "RN50-quickgelu")
    assert weights_id.startswith("file-sha256:") and not wid.is_openai(weights_id)
    assert wid.is_openai("tag:openai") and not wid.is_openai("tag:laion2b_s34b_b79k") and not wid.is_openai(None)


def _hub_file(root, content: bytes, blob_name: str | None = None):
    snap = root / "models--timm--resnet50_clip.openai" / "snapshots" / "0123abcd"
    blobs = root / "models--timm--resnet50_clip.openai" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(parents=True)
    blob = blobs / (blob_name or hashlib.sha256(content).hexdigest())
    blob.write_bytes(content)
    link = snap / "open_clip_pytorch_model.bin"
    os.symlink(os.path.relpath(blob, snap), link)
    return link


def test_a_tag_records_the_hub_revision_and_file_hash(tmp_path, caplog):
    content = b"weights from the hub"
    weights_id, info = wid.file_identity(str(_hub_file(tmp_path / "a", content)), "openai", "RN50-quickgelu")
    assert weights_id == "tag:openai"
    assert info["revision"] == "0123abcd" and info["hf_repo"] == "timm/resnet50_clip.openai"
    assert info["sha256"] == hashlib.sha256(content).hexdigest() and "hub_sha256_mismatch" not in info
    # a cached file that no longer matches the hash the hub recorded for it is reported
    with caplog.at_level(logging.WARNING):
        _, info = wid.file_identity(str(_hub_file(tmp_path / "b", content, "f" * 64)), "openai", "RN50-quickgelu")
    assert info["hub_sha256_mismatch"] == "f" * 64 and "differs" in caplog.text


def test_backbone_records_its_weights(tmp_path, tiny, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = FrozenClip("fewclip-tiny", str(path), name="tiny-file", device="cpu")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.weights_id == f"file-sha256:{sha[:16]}" and loaded.weights_info["sha256"] == sha
    monkeypatch.setattr(wid, "openai_releases", lambda: {sha: {"name": "tiny", "open_clip_model": "fewclip-tiny"}})
    again = FrozenClip("fewclip-tiny", str(path), name="tiny-file", device="cpu")
    assert again.weights_id == f"openai:{sha[:16]}"


def test_text_head_keeps_the_raw_norms(tiny):
    classes, templates = ["cat", "red fox"], ["a photo of a {}.", "art of the {}."]
    head, norms = tiny.text_head_and_norms(classes, templates)
    raw = torch.stack([tiny.model.encode_text(tiny.tokenizer([t.format(c) for t in templates])).detach().mean(0)
                       for c in classes])
    torch.testing.assert_close(norms, raw.norm(dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head, tiny.text_head(classes, templates))
    one, n1 = tiny.text_head_and_norms(classes, templates[:1])  # one template: head * norm is the raw embedding
    raw1 = tiny.model.encode_text(tiny.tokenizer([templates[0].format(c) for c in classes])).detach()
    torch.testing.assert_close(one * n1[:, None], raw1, rtol=1e-5, atol=1e-6)
