"""TaskRes: task residual tuning (Yu et al., "Task Residual for Tuning Vision-Language Models", CVPR 2023;
geekyutao/TaskRes ``trainers/taskres.py``, ``configs/trainers/TaskRes/*.yaml``, ``train_regular.sh``).

The zero-shot classifier t [C, D] stays frozen; a task residual x [C, D], initialised at zero, is learned and
added with a fixed scale alpha:

    t' = t + alpha x,     logits = 100 f . t'_c / ||t'_c||

so before training the logits are the zero-shot logits. Defaults from the reference's scripts: alpha = 0.5 (1.0 for
Flowers102), Adam lr 2e-3 (2e-4 for ImageNet), batch 256, cosine, one warmup epoch at 1e-5, 100 epochs for 1-4
shots and 200 for 8-16 (``epochs: 0`` picks that by the number of shots). The reference keeps the last epoch; here
``select`` decides (``best_val`` picks the epoch on val, never on test).

Optimiser: the reference uses Dassl's Adam with its default L2 weight decay 5e-4 (coupled: ``wd * x`` is added to
the gradient). The shared loop offers AdamW, identical to Adam without weight decay, so the decay enters the loss
here as ``wd / 2 ||x||^2``, whose gradient is exactly that coupled term, with Dassl's betas (0.9, 0.99).

Scale: the reference adds the residual to CLIP's raw, unnormalised text embeddings; the text head adapters receive
is unit-norm, so a residual of the same size moves each class embedding further here (by the raw norm's factor).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import Adapter, AdapterContext
from adapters.training import TrainsOnFeatures

EPOCHS_BY_SHOTS = {1: 100, 2: 100, 4: 100, 8: 200, 16: 200}


class TaskRes(TrainsOnFeatures, Adapter):
    """Learned residual on the text classifier.

    Args:
        residual_scale: alpha in ``t + alpha x``.
        weight_decay_l2: coupled L2 weight decay on the residual (Dassl's Adam default 5e-4), added to the loss.
        epochs_by_shots: the epoch budget by shots used when ``epochs`` is 0.
        **train_kwargs: ``TrainSpec`` fields (epochs, lr, ...).
    """

    def __init__(self, residual_scale: float = 0.5, weight_decay_l2: float = 5e-4,
                 epochs_by_shots: Mapping[int, int] | None = None, **train_kwargs: Any) -> None:
        super().__init__()
        self.residual_scale, self.weight_decay_l2 = float(residual_scale), float(weight_decay_l2)
        self.epochs_by_shots = {int(k): int(v) for k, v in (epochs_by_shots or EPOCHS_BY_SHOTS).items()}
        self.init_training(train_kwargs)
        self.residual: nn.Parameter | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        self.epochs_by_shots_budget(ctx, self.epochs_by_shots)
        self.residual = nn.Parameter(torch.zeros_like(self.text_head))

    def classifier(self) -> torch.Tensor:
        """``[C, D]`` normalised ``t + alpha x``."""
        return F.normalize(self.text_head + self.residual_scale * self.residual, dim=-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy plus the coupled L2 weight decay of the residual."""
        return F.cross_entropy(logits, labels) + 0.5 * self.weight_decay_l2 * self.residual.pow(2).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        scale = self.ctx.logit_scale if self.ctx is not None else 100.0
        return scale * x.float() @ self.classifier().t()
