"""CLIP-Adapter (Gao et al., IJCV 2023; gaopengcuhk/CLIP-Adapter ``clip_adapter.py``).

A bottleneck MLP on the image features, ``D -> D/reduction -> D`` (no biases, ReLU after each layer), mixed
back with a residual ratio r:

    f' = normalize(r * MLP(f) + (1 - r) * f),   logits = s f' W_text^T

with s the backbone's logit scale (``logit_scale.exp()`` in the reference: 100 for CLIP).

The reference applies the MLP to unnormalised encoder outputs; here the inputs are the cached normalised
features (the MLP learns the scale). The repository fixes r = 0.2 while the paper tunes it per dataset:
training uses ``ratio`` and, with ``search``, r is then chosen on val from ``ratio_grid``. The training recipe is
not in the repository; fewclip uses AdamW lr 1e-3, cosine, 200 epochs
(CoOp's budget for 16 shots), batch 32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import Adapter, AdapterContext
from adapters.training import TrainsOnFeatures


class ClipAdapter(TrainsOnFeatures, Adapter):
    """Residual bottleneck MLP on image features.

    Args:
        ratio: residual ratio r used for training (and kept when ``search`` is off).
        reduction: bottleneck factor (hidden size D / reduction).
        search: choose r on val after training, from ``ratio_grid``.
    """

    def __init__(self, ratio: float = 0.2, reduction: int = 4, search: bool = True,
                 ratio_grid: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                 **train_kwargs: Any) -> None:
        super().__init__()
        self.ratio, self.reduction, self.search = float(ratio), int(reduction), bool(search)
        self.ratio_grid = [float(r) for r in ratio_grid]
        self.init_training(train_kwargs)
        self.mlp: nn.Module | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        d = self.text_head.shape[1]
        gen = torch.Generator().manual_seed(ctx.seed)
        first, second = nn.Linear(d, max(1, d // self.reduction), bias=False), nn.Linear(
            max(1, d // self.reduction), d, bias=False)
        # Seeded initialisation (same bounds as nn.Linear's default) without touching the global RNG.
        for layer in (first, second):
            bound = 1.0 / layer.in_features ** 0.5
            with torch.no_grad():
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
        self.mlp = nn.Sequential(first, nn.ReLU(), second, nn.ReLU()).to(ctx.device)

    def new_class_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())  # the MLP acts on image features: it applies to any class

    def hparam_grid(self) -> dict[str, list[float]]:
        return {"ratio": self.ratio_grid} if self.search else {}

    def hparams(self) -> dict[str, Any]:
        return {"ratio": self.ratio}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        x = x.float()
        mixed = self.ratio * self.mlp(x) + (1.0 - self.ratio) * x
        return self.zero_shot_logits(F.normalize(mixed, dim=-1))
