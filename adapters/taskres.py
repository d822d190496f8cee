"""TaskRes: task residual tuning (Yu et al., "Task Residual for Tuning Vision-Language Models", CVPR 2023;
geekyutao/TaskRes ``trainers/taskres.py``, ``configs/trainers/TaskRes/*.yaml``, ``train_regular.sh``).

The zero-shot classifier t [C, D] stays frozen; a task residual x [C, D], initialised at zero, is learned and
added with a fixed scale alpha:

    t' = t + alpha x,     logits = 100 f . t'_c / ||t'_c||

so before training the logits are the zero-shot logits. t is the text encoder's *raw* output (``_get_base_text_
features``: the mean of the unnormalised template embeddings), whose norm s_c is not 1, so a
residual step moves the classifier's direction by about 1/s_c of what it would on a unit vector. Here
t = text_head * s (``AdapterContext.text_norms``, kept by the text store), exact for a single template (CoOp's
per-dataset prompt); for an ensemble the direction is fewclip's normalised-mean head and only the norm is the raw
mean's. The norms are part of the learned state (``base_norms``), so a restored adapter predicts identically.

Defaults from the reference's scripts: alpha = 0.5 (1.0 for Flowers102), Adam lr 2e-3 (2e-4 for ImageNet), batch
256, cosine, one warmup epoch at 1e-5, 100 epochs for 1-4 shots and 200 for 8-16 (``epochs: 0`` picks that by the
number of shots). The reference keeps the last epoch and steps the cosine once per epoch (Dassl); fewclip's
``fewshot`` protocol picks the epoch on val and steps per batch, ``protocol=reference`` follows the reference
(``conf/recipe/taskres.yaml``).

Optimiser: the reference uses Dassl's Adam (betas 0.9, 0.999: ``OPTIM.ADAM_BETA1/2``) with its default L2 weight
decay 5e-4 (coupled: ``wd * x`` is added to the gradient). The shared loop offers AdamW, identical to Adam without
weight decay, so the decay enters the loss here as ``wd / 2 ||x||^2``, whose gradient is exactly that coupled term.
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
        # Persistent: the raw norms travel with the residual, so restoring the state reproduces the classifier.
        self.register_buffer("base_norms", ctx.raw_text_norms("TaskRes").to(self.text_head.device))
        self.residual = nn.Parameter(torch.zeros_like(self.text_head))

    def base(self) -> torch.Tensor:
        """``[C, D]`` the raw zero-shot text embeddings t (``text_head`` at each class's raw norm)."""
        return self.text_head * self.base_norms[:, None]

    def classifier(self) -> torch.Tensor:
        """``[C, D]`` normalised ``t + alpha x``."""
        return F.normalize(self.base() + self.residual_scale * self.residual, dim=-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy plus the coupled L2 weight decay of the residual."""
        return F.cross_entropy(logits, labels) + 0.5 * self.weight_decay_l2 * self.residual.pow(2).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        return self.logit_scale * x.float() @ self.classifier().t()
