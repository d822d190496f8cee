"""Tip-Adapter-F (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter ``main.py``).

Tip-Adapter with the cache keys turned into a trainable ``[N, D]`` parameter initialised from the cache, trained
with cross-entropy on the Tip logits (AdamW lr 1e-3, eps 1e-4, cosine, 20 epochs, batch 256). After training,
(beta, alpha) are searched on val exactly like the training-free version. Unlike the reference, which keeps the
epoch with the best *test* accuracy, the epoch is chosen on val.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from adapters.base import AdapterContext
from adapters.tip import TipAdapter
from adapters.training import TrainsOnFeatures


class TipAdapterF(TrainsOnFeatures, TipAdapter):
    """Tip-Adapter-F. ``alpha``/``beta`` are used while training, then searched on val (``search``)."""

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, search: bool = True, beta_max: float = 7.0,
                 alpha_max: float = 3.0, beta_steps: int = 200, alpha_steps: int = 20, chunk: int = 2048,
                 memory_budget_gb: float = 4.0, **train_kwargs: Any) -> None:
        TipAdapter.__init__(self, alpha=alpha, beta=beta, search=search, beta_max=beta_max, alpha_max=alpha_max,
                            beta_steps=beta_steps, alpha_steps=alpha_steps, chunk=chunk,
                            memory_budget_gb=memory_budget_gb)
        self.init_training(train_kwargs)

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        # The keys become the learned state (the buffer set by TipAdapter.setup is replaced).
        keys = self.keys.detach().clone()
        del self.keys
        self.keys = nn.Parameter(keys)
