"""The adapter contract: what every method receives, and what it must return.

An ``Adapter`` is an ``nn.Module`` whose ``__init__`` takes scalars only (so every ``conf/adapter/*.yaml``
instantiates without a model). The runner then calls, in this order:

1. ``setup(ctx)``: the frozen side (text head, support cache, backbone) arrives;
2. ``fit(train, val)``: training for trainable adapters, model selection on ``val`` only;
3. ``tune(val)``: search of the declared hyperparameter grid on ``val`` only;
4. ``forward(x)`` on the test split, once.

``forward`` maps ``[B, D]`` float32 L2-normalised features (or ``[B, 3, S, S]`` pixels when ``input_kind``
is ``"pixels"``) to ``[B, C]`` float32 logits. The backbone is never registered as a submodule, so
``state_dict()`` holds only what the adapter learned.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

# How an adapter is scored and the default val-only search live in tuning.py, which imports nothing from here at
# run time; they are re-exported because every method imports its contract from this module.
from adapters.tuning import accuracy, evaluate, grid_search, predict_split

__all__ = ["Adapter", "AdapterContext", "FeatureSplit", "SupportSet", "accuracy", "evaluate", "grid_search",
           "predict_split"]


@dataclass
class FeatureSplit:
    """Cached features with labels: ``features [N, D]`` float32 normalised, ``labels [N]`` int64."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class SupportSet:
    """The few-shot cache.

    ``keys [N, D]``: view-averaged, renormalised features; ``labels [N]`` int64;
    ``views [A, N, D]``: per-view features (None when the store keeps none);
    ``index``: the store's searchable faiss index over ``keys`` (``caches.search.KeyIndex``; None when there is no
    store, e.g. in tests: adapters that search then build a flat one).
    """

    keys: torch.Tensor
    labels: torch.Tensor
    views: torch.Tensor | None = None
    index: Any = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class AdapterContext:
    """The frozen side handed to ``Adapter.setup``.

    ``text_head [C, D]``: L2-normalised zero-shot weights in the order of ``classnames``.
    ``text_norms [C]``: the norm of each class's raw (unnormalised) mean text embedding, so that
    ``text_head * text_norms[:, None]`` is the text encoder's raw output for single-template heads: methods whose
    reference code works on raw embeddings (TaskRes, CLAP) need it; None when unknown.
    ``backbone``: the ``FrozenClip`` (needed by prompt learners and pixel adapters only).
    """

    classnames: list[str]
    text_head: torch.Tensor
    support: SupportSet
    logit_scale: float = 100.0
    backbone: Any = None
    device: torch.device = torch.device("cpu")
    seed: int = 1
    progress: bool | None = None  # None: bars on a terminal only
    pixels: Any = None  # caches.data.pixels.PixelData, for input_kind == "pixels" adapters only
    text_norms: torch.Tensor | None = None

    def raw_text_norms(self, method: str) -> torch.Tensor:
        """``text_norms [C]``, or ones with a warning when the context has none (unit-norm head)."""
        if self.text_norms is not None:
            return self.text_norms.float()
        import logging

        logging.getLogger(__name__).warning(
            "%s: the raw text norms are unknown, so the text head is used at unit norm; the reference's step sizes "
            "and penalty then differ by the squared raw norm", method)
        return torch.ones(self.text_head.shape[0])

    @property
    def n_classes(self) -> int:
        return len(self.classnames)


class Adapter(nn.Module, ABC):
    """Base class of every method. Subclasses set the class attributes and implement ``forward``."""

    input_kind: ClassVar[str] = "features"  # or "pixels" for adapters that change the image encoder
    trainable: ClassVar[bool] = False
    cost: ClassVar[str] = "training-free"

    def __init__(self) -> None:
        super().__init__()
        self.ctx: AdapterContext | None = None
        self.register_buffer("text_head", torch.empty(0), persistent=False)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, ctx: AdapterContext) -> None:
        """Receive the frozen side. Subclasses extend this to build their modules."""
        self.ctx = ctx
        self.text_head = ctx.text_head.float().to(ctx.device)

    def fit(self, train: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        """Train on the support set; select models on ``val`` only. Training-free adapters do nothing.

        Returns a record of what was done (epochs, selection), stored in ``result.json``.
        """
        return {}

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` features (or ``[B, 3, S, S]`` pixels) -> ``[B, C]`` float32 logits."""

    def new_class_state(self) -> dict[str, torch.Tensor] | None:
        """What the fitted adapter carries to classes it has no shots of (base-to-novel evaluation).

        None (the default) means the method cannot score unseen classes (caches and probes need shots of every
        class). Methods whose learned state does not depend on the classes (prompt contexts, image-side
        adapters) return the tensors to load into a fresh instance set up for the new classes.
        """
        return None

    def lookup_record(self) -> dict[str, Any] | None:
        """How the adapter reads its cache (``dense`` or ``topk``, with the index and k), for ``result.json``;
        None for adapters without a cache."""
        return None

    def hparam_grid(self) -> dict[str, Sequence[Any]]:
        """Hyperparameters to search on val, as ``{attribute: values}`` (searched in row-major order)."""
        return {}

    def hparams(self) -> dict[str, Any]:
        """Current values of the searched hyperparameters (recorded in ``result.json``)."""
        return {k: getattr(self, k) for k in self.hparam_grid()}

    def tune(self, val: FeatureSplit) -> dict[str, Any]:
        """Search ``hparam_grid()`` on ``val`` and keep the best. Override for a faster exact search."""
        return grid_search(self, val)

    # ------------------------------------------------------------------ cost model (adapter=auto's budget)
    def estimate_fit_seconds(self, train: SupportSet, val: FeatureSplit, limit_s: float = math.inf) -> float:
        """Predicted seconds of ``fit(train, val)`` + ``tune(val)`` on this machine, called after ``setup``.

        From the data sizes and a short probe run that leaves the adapter as it was. A probe may stop early once
        the prediction clearly exceeds ``limit_s`` (it then returns a value above it). The default suits adapters
        whose ``fit`` does nothing (their work is in ``setup``): the search's cost. Trainable adapters override it.
        """
        return self.estimate_tune_seconds(val)

    def estimate_tune_seconds(self, val: FeatureSplit) -> float:
        """Predicted seconds of ``tune(val)``: one val evaluation (timed once) per point of ``hparam_grid()``."""
        grid = self.hparam_grid()
        if not grid:
            return 0.0
        points = 1
        for values in grid.values():
            points *= len(values)
        return points * self.estimate_eval_seconds(val)

    def estimate_eval_seconds(self, val: FeatureSplit) -> float:
        """Seconds of one evaluation on ``val`` (timed)."""
        start = time.perf_counter()
        evaluate(self, val)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ shared pieces
    @property
    def logit_scale(self) -> float:
        """The scale of cosine logits: the backbone's (``AdapterContext.logit_scale``); CLIP's 100 before ``setup``."""
        return self.ctx.logit_scale if self.ctx is not None else 100.0

    def zero_shot_logits(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP's zero-shot logits: ``logit_scale * f @ text_head^T``, ``[B, D] -> [B, C]``."""
        return self.logit_scale * features.float() @ self.text_head.t()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Logits in eval mode, batched: ``[N, ...] -> [N, C]`` float32 on CPU."""
        was_training = self.training
        self.eval()
        out = [self(x[i : i + batch_size].to(self.text_head.device)).float().cpu()
               for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, len(self.text_head))
