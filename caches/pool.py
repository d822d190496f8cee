"""Support sets grown from an unlabeled pool: retrieve, for each class, the pool images nearest to its text
embedding and/or its shots, pseudo-label them with the class, and add them to the cache with their provenance.

This follows SuS-X (Udandarao et al., ICCV 2023; vishaal27/SuS-X): ``retrieve_urls_lc_sus.py`` queries a CLIP
k-NN index of LAION-5B with each class's text prompt and labels every image it returns with that class;
``encode_sus_lc.py`` encodes those images with CLIP's eval preprocessing (its "augment" passes use the deterministic
``preprocess``, so they are the eval features), L2-normalises them, and ``tipx.py`` uses them as the cache (keys and
one-hot values) of a Tip-Adapter-style classifier. Here the pool is the user's own unlabeled images instead of
LAION, and:

* ``by``: ``text`` retrieves with the class's zero-shot text embedding (SuS-LC's query, on the pool's faiss index);
  ``image`` with the class's shots (each shot's nearest pool images; a pool image scores its best similarity to any
  shot of the class: the pseudo-labelling-by-nearest-neighbour of label propagation); ``both`` fuses the two
  rankings by reciprocal rank fusion (score = sum of 1 / (60 + rank), Cormack et al., SIGIR 2009), which needs no
  calibration between text-image and image-image similarities.
* ``per_class`` (M): pool images taken per class (SuS-X's support-set size per class, ``--num_images``).
* A pool image retrieved by several classes goes to the one whose zero-shot probability (softmax of
  ``logit_scale x cosine`` with the text head) is highest; it is then dropped when that probability is below
  ``threshold`` (a confidence filter SuS-X does not have: its LAION images are labelled by their query alone).

All three are chosen on val by the application (``fewclip.pool``); the pool is encoded once, into the eval feature
bank of the pool (``CacheBuilder.features``), whatever the settings.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caches.data.records import IMAGE_EXTENSIONS, DatasetError, ImageDataset, Sample
from caches.search import KeyIndex

log = logging.getLogger(__name__)

POOL_BY = ("text", "image", "both")
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al.)
POOL_CLASS = "unlabeled"


class PoolError(DatasetError):
    """The pool path or its settings are wrong. The message says what was expected."""


def load_pool(path: str, exclude: set[str] | frozenset[str] = frozenset()) -> ImageDataset:
    """The unlabeled images of a folder (recursive, known image extensions) or a CSV with a ``path`` column
    (relative to the CSV), as a one-class ``ImageDataset`` whose ``train`` split is the pool.

    Args:
        exclude: resolved paths that must not be in the pool (the labelled dataset's images): dropped, with a
            warning, so that a val or test image cannot enter the cache through the pool.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = [str(f.resolve()) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        root = p.resolve()
    elif p.is_file() and p.suffix.lower() == ".csv":
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise PoolError(f"pool CSV {p} has columns {reader.fieldnames}; it needs a 'path' column")
            files = [str((p.parent / r["path"].strip()).resolve()) for r in reader if (r.get("path") or "").strip()]
        root = p.parent.resolve()
    else:
        raise PoolError(f"pool={path}: no such folder or CSV file (a folder of images, or a CSV with a 'path' "
                        "column)")
    files = list(dict.fromkeys(files))  # a file listed twice is one pool image
    inside = [f for f in files if f in exclude]
    if inside:
        log.warning("%d pool images are images of the dataset itself (e.g. %s): left out of the pool", len(inside),
                    inside[0])
        files = [f for f in files if f not in exclude]
    if not files:
        raise PoolError(f"pool={path} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    samples = [Sample(id=str(Path(f).relative_to(root)) if Path(f).is_relative_to(root) else f, label=0, path=f)
               for f in files]
    name = "pool-" + hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:10]
    return ImageDataset(name=name, classnames=[POOL_CLASS], templates=["{}"],
                        splits={"train": samples, "val": [], "test": []},
                        source={"kind": "pool", "path": str(p.resolve())})


@dataclass(frozen=True)
class PoolChoice:
    """One setting of the pool: images per class, how they are retrieved, the confidence they need."""

    per_class: int
    by: str = "text"
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.per_class < 0:
            raise PoolError(f"pool.per_class must be >= 0, got {self.per_class}")
        if self.by not in POOL_BY:
            raise PoolError(f"pool.by must be one of {POOL_BY}, got {self.by!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise PoolError(f"pool.threshold is a probability in [0, 1], got {self.threshold}")

    def as_dict(self) -> dict[str, Any]:
        return {"per_class": self.per_class, "by": self.by, "threshold": self.threshold}


@dataclass
class Grown:
    """The pool images added to a support set: ``rows [M]`` pool rows, ``labels [M]`` their pseudo-labels,
    ``similarity [M]`` (text or best-shot cosine; the RRF score for ``both``), ``confidence [M]`` (zero-shot
    probability of the pseudo-label)."""

    rows: torch.Tensor
    labels: torch.Tensor
    similarity: torch.Tensor
    confidence: torch.Tensor

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def _ranked(scores: torch.Tensor, rows: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m best distinct rows of a flat (score, row) list, best first (a row keeps its best score)."""
    order = torch.argsort(scores, descending=True, stable=True)
    scores, rows = scores[order], rows[order]
    first = torch.ones_like(rows, dtype=torch.bool)
    seen: set[int] = set()
    for i, r in enumerate(rows.tolist()):
        if r in seen:
            first[i] = False
        seen.add(r)
    return scores[first][:m], rows[first][:m]


def retrieve(index: KeyIndex, text: torch.Tensor, shot_keys: torch.Tensor, shot_labels: torch.Tensor, m: int,
             by: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each class, its ``m`` pool candidates, best first: ``[(scores [m], rows [m])] * C``.

    Args:
        index: the pool's faiss index (keys = pool features).
        text: ``[C, D]`` text head; shot_keys ``[N, D]`` and shot_labels ``[N]``: the labelled support set.
    """
    n_cls = text.shape[0]
    m = min(m, index.ntotal)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    if by in ("text", "both"):
        t_scores, t_rows = index.search(text.float().cpu(), m)
    if by in ("image", "both"):
        i_scores, i_rows = index.search(shot_keys.float().cpu(), m)
        labels = shot_labels.cpu()
    for c in range(n_cls):
        if by == "text":
            out.append((t_scores[c], t_rows[c]))
            continue
        mine = labels == c
        img = _ranked(i_scores[mine].reshape(-1), i_rows[mine].reshape(-1), m)
        if by == "image":
            out.append(img)
            continue
        fused: dict[int, float] = {}
        for rows in (t_rows[c], img[1]):
            for rank, r in enumerate(rows.tolist()):
                fused[r] = fused.get(r, 0.0) + 1.0 / (RRF_K + rank + 1)
        ranked = sorted(fused.items(), key=lambda kv: -kv[1])[:m]  # stable: text order first on ties
        out.append((torch.tensor([s for _, s in ranked], dtype=torch.float32),
                    torch.tensor([r for r, _ in ranked], dtype=torch.int64)))
    return out


def grow(pool_keys: torch.Tensor, candidates: list[tuple[torch.Tensor, torch.Tensor]], text: torch.Tensor,
         threshold: float, logit_scale: float = 100.0) -> Grown:
    """Pseudo-label the retrieved pool images.

    A pool image retrieved by several classes is kept once, for the class of highest zero-shot probability among
    those that retrieved it; it is dropped when that probability is below ``threshold``.
    Args:
        pool_keys: ``[P, D]`` pool features; candidates: ``retrieve``'s per-class lists; text: ``[C, D]``.
    """
    claims: dict[int, list[tuple[int, float]]] = {}
    for c, (scores, rows) in enumerate(candidates):
        for s, r in zip(scores.tolist(), rows.tolist()):
            claims.setdefault(r, []).append((c, s))
    if not claims:
        empty = torch.empty(0)
        return Grown(empty.long(), empty.long(), empty, empty)
    rows = torch.tensor(sorted(claims), dtype=torch.int64)
    probs = (logit_scale * pool_keys[rows].float() @ text.float().t()).softmax(dim=-1)  # [R, C]
    keep_rows, labels, sims, confs = [], [], [], []
    for i, r in enumerate(rows.tolist()):
        c, s = max(claims[r], key=lambda cs: (float(probs[i, cs[0]]), -cs[0]))
        p = float(probs[i, c])
        if p >= threshold:
            keep_rows.append(r)
            labels.append(c)
            sims.append(s)
            confs.append(p)
    return Grown(torch.tensor(keep_rows, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64),
                 torch.tensor(sims, dtype=torch.float32), torch.tensor(confs, dtype=torch.float32))
