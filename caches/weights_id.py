"""Which weights a backbone loaded: OpenAI's released files recognised by hash, Hugging Face snapshots by revision.

Published CLIP few-shot numbers were measured with OpenAI's weights. A run is comparable with them when its weights
are OpenAI's, whichever way they arrived:

- an open_clip tag (``pretrained=openai``): the file comes from the Hugging Face cache; the identity records the
  repository, the snapshot revision, the file name and the file's sha256 (computed, and checked against the
  cache's blob name, which Hugging Face sets to the sha256 of large files);
- a local file: its sha256 is looked up in ``openai_weights.json`` (the hashes OpenAI's download URLs embed), so
  ``RN50.pt`` downloaded from OpenAI is recognised as OpenAI's, and any other file is identified by its hash.

``weights_id`` values: ``tag:<tag>``, ``openai:<sha256[:16]>`` (a local copy of an OpenAI release),
``file-sha256:<sha256[:16]>``, ``local-dir-sha256:...``, ``random:...``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TABLE = Path(__file__).with_name("openai_weights.json")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def openai_releases() -> dict[str, dict[str, Any]]:
    """sha256 -> ``{"name", "file", "url", "open_clip_model"}`` for OpenAI's released weight files."""
    data = json.loads(TABLE.read_text())
    return {v["sha256"]: {"name": k, **v} for k, v in data["files"].items()}


def is_openai(weights_id: str | None) -> bool:
    """True for OpenAI's weights: the open_clip ``openai`` tag or a local file with an OpenAI release hash."""
    return bool(weights_id) and (weights_id == "tag:openai" or weights_id.startswith("openai:"))


def hub_snapshot(path: str) -> dict[str, Any]:
    """Repository, revision and blob of a file in the Hugging Face cache (``models--org--name/snapshots/<rev>/f``)."""
    parts = Path(path).parts
    out: dict[str, Any] = {}
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts):
            out["revision"] = parts[i + 1]
        repo = next((p for p in parts[:i] if p.startswith("models--")), None)
        if repo:
            out["hf_repo"] = repo.removeprefix("models--").replace("--", "/")
    blob = Path(os.path.realpath(path)).name
    if re.fullmatch(r"[0-9a-f]{64}", blob):
        out["blob_sha256"] = blob
    return out


def file_identity(path: str, tag: str | None, model: str) -> tuple[str, dict[str, Any]]:
    """``(weights_id, details)`` of a weights file, loaded by ``tag`` (from the hub cache) or as a local file."""
    sha = sha256_file(path)
    details: dict[str, Any] = {"file": os.path.basename(path), "sha256": sha}
    if tag is not None:
        details.update({"tag": tag, **hub_snapshot(path)})
        blob = details.pop("blob_sha256", None)
        if blob is not None and blob != sha:
            log.warning("weights %s: sha256 %s differs from the Hugging Face cache's record %s: the cached file was "
                        "changed or is damaged", path, sha, blob)
            details["hub_sha256_mismatch"] = blob
        return f"tag:{tag}", details
    release = openai_releases().get(sha)
    if release is not None:
        details["openai_release"] = release["name"]
        if release["open_clip_model"] != model:
            log.warning("weights %s are OpenAI's %s release, for open_clip model %s; backbone.model is %s",
                        path, release["name"], release["open_clip_model"], model)
        return f"openai:{sha[:16]}", details
    return f"file-sha256:{sha[:16]}", details
