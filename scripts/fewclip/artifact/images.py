"""Images as the user gives them: files, folders and CSV lists of paths found, and decoded to RGB for the
encoder (an unreadable image is reported, never fatal)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from caches.data.records import IMAGE_EXTENSIONS
from fewclip.artifact.format import ArtifactError


def open_rgb(item: str | os.PathLike | Image.Image) -> Image.Image:
    """A path or PIL image as a fully read RGB image (the file is closed before returning)."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as img:
        img.load()
        return img.convert("RGB")


class ImageFiles(Dataset):
    """Paths or PIL images -> ``([3, S, S] pixels, "")``, or ``(zeros, error text)`` for an unreadable image."""

    def __init__(self, items: Sequence[Any], transform: Any, size: int) -> None:
        self.items, self.transform, self.size = list(items), transform, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return self.transform(open_rgb(self.items[i])), ""
        except Exception as e:  # PIL raises many types for corrupt, truncated or non-image files: report, go on
            return torch.zeros(3, self.size, self.size), f"{type(e).__name__}: {e}"


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image paths from files, folders (recursive, known image extensions) and CSV files (a ``path`` column,
    relative to the CSV). An explicitly named file is taken whatever its extension.

    Raises:
        ArtifactError: a named path does not exist, a CSV has no ``path`` column, or nothing was found.
    """
    found: list[str] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found += [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif p.is_file() and p.suffix.lower() == ".csv":
            with open(p, newline="") as f:
                reader = csv.DictReader(f)
                if "path" not in (reader.fieldnames or []):
                    raise ArtifactError(f"{p} has columns {reader.fieldnames}; a list of images needs a 'path' column")
                found += [str(p.parent / r["path"].strip()) for r in reader if (r.get("path") or "").strip()]
        elif p.is_file():
            found.append(str(p))
        else:
            raise ArtifactError(f"{p}: no such file or folder")
    if not found:
        raise ArtifactError(f"no images found in {', '.join(map(str, inputs))} (extensions: "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
    return found
