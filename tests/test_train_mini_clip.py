"""scripts/train_mini_clip.py: a short run on a CSV source trains, logs, and is reproducible to the byte."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_mini_clip  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}


@pytest.fixture(scope="module")
def csv_source(tmp_path_factory) -> Path:
    """24 drawings: a filled square or disc of one of 4 colours on white, captioned with both words."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    rows = ["path,caption"]
    for i in range(24):
        name = list(COLOURS)[i % 4]
        shape = "square" if i % 8 < 4 else "disc"
        img = np.full((40, 40, 3), 255, np.uint8)
        yy, xx = np.mgrid[:40, :40]
        cx, cy = rng.integers(14, 26, size=2)
        mask = (abs(xx - cx) < 10) & (abs(yy - cy) < 10) if shape == "square" else (xx - cx) ** 2 + (yy - cy) ** 2 < 100
        img[mask] = COLOURS[name]
        Image.fromarray(img).save(root / f"{i}.png")
        rows += [f"{i}.png,a clip art of a {name} {shape}", f"{i}.png,{name} {shape}"]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def _train(csv: Path, out: Path, cache: Path) -> dict:
    args = ["--sources", f"csv:{csv}", "--epochs", "2", "--batch-size", "8", "--holdout", "0.25", "--threads", "1",
            "--workers", "1", "--cache-dir", str(cache), "--out", str(out), "--no-resume"]
    assert train_mini_clip.main(args) == 0
    return json.loads(out.with_name(out.stem + ".train.json").read_text())


def test_two_runs_write_the_same_bytes_and_log_every_epoch(csv_source, tmp_path):
    first = _train(csv_source, tmp_path / "a" / "m.safetensors", tmp_path / "cache_a")
    second = _train(csv_source, tmp_path / "b" / "m.safetensors", tmp_path / "cache_b")
    a, b = (tmp_path / d / "m.safetensors" for d in "ab")
    digest = hashlib.sha256(a.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(b.read_bytes()).hexdigest(), "same command, same seed: different files"
    assert first["weights"]["sha256"] == digest  # the log names the file it wrote
    # the log: one line per epoch (plus the untrained model's retrieval as epoch 0), losses finite
    assert [h["epoch"] for h in first["history"]] == [0, 1, 2]
    assert all(np.isfinite(h["loss"]) for h in first["history"][1:])
    timing = {"wall_s", "cpu_s", "loadavg_1m"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in first["history"]] == \
        [{k: v for k, v in h.items() if k not in timing} for h in second["history"]]
    # fp16 weights; the header's metadata keys written in sorted order (safe_open's metadata() is a dict in no
    # fixed order, so the order is read from the header's bytes)
    from safetensors import safe_open

    with safe_open(str(a), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    raw = a.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == ["format", "model"]


def test_canonical_header_sorts_the_metadata_and_keeps_the_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.ones(5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"zeta": "1", "alpha": "2", "mid": "3"})
    # the same file with its metadata written in the other order, as safetensors may write it
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode()
    other = tmp_path / "u.safetensors"
    other.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])
    for p in (path, other):
        train_mini_clip.canonical_header(p)
    assert path.read_bytes() == other.read_bytes()
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert json.loads(path.read_bytes()[8 : 8 + n])["__metadata__"] == {"alpha": "2", "mid": "3", "zeta": "1"}
