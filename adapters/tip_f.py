"""Tip-Adapter-F (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter ``main.py``).

Tip-Adapter with the cache keys turned into a trainable ``[N, D]`` parameter initialised from the cache, trained
with cross-entropy on the Tip logits (AdamW lr 1e-3, eps 1e-4, cosine, 20 epochs, batch 256). After training,
(beta, alpha) are searched on val exactly like the training-free version. Unlike the reference, which keeps the
epoch with the best *test* accuracy, the epoch is chosen on val (scored after every epoch, as the reference scores
test). An epoch is one cached augmented view of every support image (the reference draws one fresh augmentation
per image per epoch): ``ceil(C K / 256)`` steps, 63 at ImageNet's 16,000 images.

The reference trains at (beta, alpha) set by hand per dataset (``configs/*.yaml`` init_beta, init_alpha: beta 1
everywhere), which ``protocol=reference`` keeps (``train_at: fixed``). fewclip's protocol first searches them on val
with the untrained cache (``train_at: search``, ``tip.fit_from_start``) and trains there: on fewclip-mini's first
weights on digits beta 1 made the kernel nearly flat (the val optimum was near beta 100), and training there ended
18 points lower.
Where the searched point saturates (support loss exactly 0: no gradient), training falls back to the configured
values, with a warning (``tip.fit_from_start``).

**Cost at ImageNet scale** (N = C K = 16,000 keys, D = 1024): a step is two ``[256, 1024] x [1024, 16,000]``
products (the affinities and the keys' gradient), 16.8 GFLOP, and an AdamW update of the 16 M key values (the fused
kernel, ``training._optimizer``); 1,260 steps over 20 epochs, plus a 131 GFLOP val evaluation per epoch (4,000
queries): about 24 TFLOP in float32, inherent to training every key with the reference's schedule.

With a large cache (``lookup``, see ``adapters/tip.py``) training and the epoch choice use every key (the dense
formula, whose gradient reaches every key); afterwards a faiss index of the cache's type is built over the trained
keys and (beta, k, alpha) are searched and predictions made through each query's k nearest trained keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from adapters.base import AdapterContext, FeatureSplit, SupportSet
from adapters.tip import TipAdapter, check_train_at, fit_from_start, start_search_seconds
from adapters.topk import DENSE_MAX_KEYS
from adapters.training import TrainsOnFeatures


class TipAdapterF(TrainsOnFeatures, TipAdapter):
    """Tip-Adapter-F. ``alpha``/``beta`` are used while training, then searched on val (``search``).

    Args:
        train_at: ``fixed`` trains at ``alpha``/``beta`` (the reference's per-dataset init values); ``search`` first
            searches them on val with the untrained cache (``tip.fit_from_start``).
        (the rest as ``TipAdapter``, plus ``TrainSpec`` fields)
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, search: bool = True, beta_max: float = 7.0,
                 alpha_max: float = 3.0, beta_steps: int = 200, alpha_steps: int = 20, chunk: int = 2048,
                 memory_budget_gb: float = 4.0, lookup: str = "auto",
                 topk: int | Sequence[int] = (16, 32, 64, 128, 256), dense_max_keys: int = DENSE_MAX_KEYS,
                 grid: str = "linear", beta_min: float = 0.1, alpha_min: float = 0.1, train_at: str = "fixed",
                 **train_kwargs: Any) -> None:
        TipAdapter.__init__(self, alpha=alpha, beta=beta, search=search, beta_max=beta_max, alpha_max=alpha_max,
                            beta_steps=beta_steps, alpha_steps=alpha_steps, chunk=chunk,
                            memory_budget_gb=memory_budget_gb, lookup=lookup, topk=topk,
                            dense_max_keys=dense_max_keys, grid=grid, beta_min=beta_min, alpha_min=alpha_min)
        self.init_training(train_kwargs)
        self.train_at = check_train_at(train_at)
        self._fitting = False

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        # The keys become the learned state (the buffer set by TipAdapter.setup is replaced).
        keys = self.keys.detach().clone()
        del self.keys
        self.keys = nn.Parameter(keys)

    @property
    def uses_topk(self) -> bool:
        # Dense while training (gradients reach every key); top-k over the trained keys afterwards.
        return self.lookup_mode == "topk" and not self._fitting

    def fit(self, train: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        return fit_from_start(self, train, val, lambda: self._fit(train, val))

    def _fit(self, train: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        self._fitting = True
        try:
            return super().fit(train, val)
        finally:
            self._fitting = False

    def estimate_fit_seconds(self, train_set: SupportSet, val: FeatureSplit, limit_s: float = math.inf) -> float:
        return super().estimate_fit_seconds(train_set, val, limit_s) + start_search_seconds(self, val)
