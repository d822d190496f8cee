"""A fitted classifier loaded from an artifact: ``load_artifact`` and the ``Artifact`` it returns, which predicts
class probabilities for image files, PIL images or preprocessed pixels."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from adapters.base import Adapter
from caches.backbone import FrozenClip
from caches.store import KVStore
from caches.workers import loader_options
from fewclip.artifact.add_class import add_class_to
from fewclip.artifact.format import (
    BACKBONE_TARGETS,
    ArtifactError,
    adapter_context,
    check_backbone,
    instantiate_adapter,
    load_stores,
    read_info,
    search_params,
    support_set,
)
from fewclip.artifact.images import ImageFiles
from fewclip.runner import restore_adapter

log = logging.getLogger(__name__)


@dataclass
class FilePredictions:
    """Predictions for a list of images.

    ``probs [N, C]`` float32 softmax probabilities, a NaN row for an image that could not be read;
    ``errors[i]`` is None, or why image ``i`` was not read.
    """

    items: list[Any]
    probs: torch.Tensor
    errors: list[str | None]

    @property
    def unreadable(self) -> list[tuple[Any, str]]:
        return [(item, e) for item, e in zip(self.items, self.errors) if e is not None]


class Artifact:
    """A fitted classifier loaded from an artifact directory (use ``load_artifact``).

    Attributes:
        path: the directory. info: ``artifact.json``. backbone: the ``FrozenClip``. adapter: the fitted adapter.
        text_store, support_store: the artifact's ``KVStore`` s (text head ``[C, D]``, support cache ``[N, D]``).
    """

    def __init__(self, path: Path, info: dict[str, Any], backbone: FrozenClip, adapter: Adapter, text: KVStore,
                 support: KVStore) -> None:
        from caches.data.augment import eval_transform

        self.path, self.info, self.backbone, self.adapter = path, info, backbone, adapter
        self.text_store, self.support_store = text, support
        self.transform = eval_transform(backbone.image_spec)

    def __repr__(self) -> str:
        return (f"Artifact({str(self.path)!r}, adapter={self.info['adapter']['name']}, "
                f"backbone={self.info['backbone']['model']}, classes={len(self.classnames)})")

    @property
    def classnames(self) -> list[str]:
        """Class names in the order of the probability columns."""
        return list(self.info["classnames"])

    @property
    def templates(self) -> list[str]:
        return list(self.info["templates"])

    def _workers(self, num_workers: int | None, items: Sequence[Any]) -> int:
        if num_workers is not None:
            return num_workers
        # Decoding workers only pay off when the encoder runs elsewhere: on CPU they take the cores it uses.
        if self.backbone.device.type != "cuda" or any(isinstance(i, Image.Image) for i in items):
            return 0
        return min(4, os.cpu_count() or 1)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The adapter's logits for preprocessed images: ``[B, 3, S, S] -> [B, C]`` float32 on CPU.

        Feature-mode adapters get the encoded features; pixel-mode ones (MaPLe, DPT, CoOp on pixels) the pixels.
        """
        if self.adapter.input_kind == "pixels":
            return self.adapter.predict(pixels, batch_size=max(1, len(pixels)))
        return self.adapter.predict(self.backbone.encode_images(pixels))

    def predict_files(self, images: Sequence[str | os.PathLike | Image.Image], batch_size: int = 64,
                      num_workers: int | None = None, progress: bool = False) -> FilePredictions:
        """Probabilities for image files (or PIL images), batched; unreadable images are reported, not fatal.

        Returns:
            ``FilePredictions`` with ``probs [N, C]`` (NaN rows for unreadable images) and the errors.
        """
        from caches.progress import Progress

        items = list(images)
        n, size = len(items), self.backbone.image_spec.size
        probs = torch.full((n, len(self.classnames)), float("nan"))
        errors: list[str | None] = [None] * n
        workers = self._workers(num_workers, items)
        loader = DataLoader(ImageFiles(items, self.transform, size), batch_size=batch_size, shuffle=False,
                            num_workers=workers, pin_memory=self.backbone.device.type == "cuda",
                            **loader_options(workers))
        start = 0
        with Progress(total=n, desc="predict", unit="img", enabled=progress) as bar:
            for pixels, errs in loader:
                ok = torch.tensor([not e for e in errs])
                rows = torch.arange(start, start + len(errs))
                for r in rows[~ok].tolist():
                    errors[r] = errs[r - start]
                    log.warning("unreadable image %s (%s): not predicted", items[r], errors[r])
                if bool(ok.any()):
                    probs[rows[ok]] = self.logits(pixels[ok]).softmax(dim=-1)
                start += len(errs)
                bar.update(len(errs))
        return FilePredictions(items=items, probs=probs, errors=errors)

    def predict(self, images: Sequence[str | os.PathLike | Image.Image] | torch.Tensor, batch_size: int = 64,
                progress: bool = False) -> torch.Tensor:
        """Class probabilities (softmax over the adapter's logits): ``[B, C]`` float32, columns in ``classnames``.

        Args:
            images: paths, PIL images, or a ``[B, 3, S, S]`` tensor already preprocessed as
                ``info["preprocessing"]`` says (``eval_transform``).
        Raises:
            ArtifactError: an image cannot be read (use ``predict_files`` to get the others anyway), or a tensor
                of the wrong shape.
        """
        if isinstance(images, torch.Tensor):
            size = self.backbone.image_spec.size
            if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
                raise ArtifactError(f"expected preprocessed pixels [B, 3, {size}, {size}], got {tuple(images.shape)}")
            return torch.cat([self.logits(images[i : i + batch_size]).softmax(dim=-1)
                              for i in range(0, len(images), batch_size)]) if len(images) else \
                torch.empty(0, len(self.classnames))
        result = self.predict_files(images, batch_size=batch_size, progress=progress)
        if result.unreadable:
            listed = "; ".join(f"{item}: {e}" for item, e in result.unreadable[:5])
            raise ArtifactError(f"{len(result.unreadable)} images could not be read ({listed}); "
                                "Artifact.predict_files predicts the others")
        return result.probs

    # ------------------------------------------------------------------ adding a class
    def add_class(self, name: str, images: Sequence[str | os.PathLike | Image.Image] = (), batch_size: int = 64,
                  progress: bool = False) -> dict[str, Any]:
        """Add a class without refitting, and save the artifact (atomically). See the module docstring for which
        adapters allow it; the hyperparameters chosen on val stay as they are.

        Args:
            name: the class name (the text head row is built from it with the artifact's templates).
            images: the class's shots (paths or PIL images); needed by tip, gda and ape, unused by the others.
        Returns:
            what was done: ``{"classname", "how", "n_images", "unreadable": [[image, error], ...]}``.
        Raises:
            AddClassError: the adapter refuses, the name exists, or no image could be read.
        """
        record, self.adapter, self.info = add_class_to(self, name, images, batch_size=batch_size, progress=progress)
        self.text_store, self.support_store = load_stores(self.path, self.info)
        return record


def _load_backbone(record: dict[str, Any], device: str, pretrained: str | None) -> FrozenClip:
    from caches.backbone import load_backbone

    node = dict(record.get("config") or {})
    if node.get("_target_") not in BACKBONE_TARGETS:
        raise ArtifactError(f"artifact backbone loader {node.get('_target_')!r} is not one of {BACKBONE_TARGETS}")
    kwargs = {k: node[k] for k in ("model", "pretrained", "name", "seed", "weights_cache_dir") if k in node}
    if pretrained is not None:
        kwargs["pretrained"] = pretrained
    try:
        return load_backbone(**kwargs, device=device)
    except FileNotFoundError as e:
        raise ArtifactError(f"{e} The artifact was fitted with backbone.pretrained={kwargs.get('pretrained')}; "
                            "pass the weights file's path here (--pretrained PATH, or pretrained=PATH)") from e


def load_artifact(path: str | os.PathLike, device: str = "auto", backbone: FrozenClip | None = None,
                  pretrained: str | None = None) -> Artifact:
    """Open an artifact: verify it, load (or check) the backbone, rebuild the fitted adapter.

    Args:
        path: the artifact directory.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``; ignored when ``backbone`` is given.
        backbone: an already loaded ``FrozenClip`` to use instead of loading the recorded one (checked all the same).
        pretrained: weights to load instead of the recorded ones (a tag or a file; e.g. the same file in another
            place). They must be the weights the artifact was fitted with.
    Raises:
        ArtifactError: missing or damaged artifact; BackboneMismatchError: other model or weights.
    """
    path = Path(path)
    info = read_info(path)
    text, support = load_stores(path, info)
    bb = backbone if backbone is not None else _load_backbone(info["backbone"], device, pretrained)
    check_backbone(info["backbone"], bb)
    adapter = instantiate_adapter(info["adapter"]["config"])
    adapter.setup(adapter_context(info["classnames"], text.keys(), support_set(support, search_params(path)), bb,
                                  int(info["seed"])))
    restore_adapter(adapter, path)
    return Artifact(path, info, bb, adapter, text, support)
