"""KgCoOp: knowledge-guided context optimisation (Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided
Context Optimization", CVPR 2023; htyao89/KgCoOp ``trainers/kgcoop.py``, ``configs/trainers/KgCoOp/rn50_ep100.yaml``,
``scripts/base2new_train.sh``).

CoOp plus a term that keeps the class embeddings of the learned prompts w_c near the hand-crafted ones t_c (the
text features of "a photo of a {class}." style prompts, both L2-normalised):

    L = CE + lambda * (1 - (1/C) sum_c cos(w_c, t_c)),        lambda = 8.0

This is the reference's code; for unit vectors ||w - t||^2 = 2 (1 - cos), so it is the paper's
lambda * (1/C) sum_c ||w_c - t_c||^2 with a factor 1/2, and lambda = 8.0 refers to this form. The hand-crafted
embeddings are the run's text head (the same templates as zero-shot CLIP and every other adapter; the reference
uses one template per dataset, CoOp's, with "a photo of a {}, a type of texture." for DTD).

The weight and the temperature. The reference multiplies only the cross-entropy's cosines by the model's temperature
(``logit_scale.exp()``: 100 for OpenAI CLIP), so lambda = 8.0 sets the balance of the two terms at a logit scale of
100. fewclip applies ``lambda x s / weight_logit_scale`` (``knowledge_weight``) for a run of logit scale s, with
``weight_logit_scale`` = 100: exactly lambda for every CLIP model, the same balance for weights trained to another
temperature. Measured with fewclip-mini's first weights (s = 14.16, digits, 16 shots, 100 epochs): with lambda =
8.0 unscaled, the knowledge term's gradient on the context at initialisation was 5.7 times the cross-entropy's (0.2
times at s = 100), the prompts stayed at the hand-crafted anchors and KgCoOp ended below zero-shot on val (12.5% vs
17.5%); with 8.0 x 14.16 / 100 = 1.13 it ended at 27.5%. ``weight_logit_scale: null`` applies lambda as given.

Defaults from the reference's configs: 4 context vectors initialised from "a photo of a", class token at the end,
SGD lr 0.002 (momentum 0.9, weight decay 5e-4: Dassl's defaults), cosine, one warmup epoch at 1e-5, batch 128,
100 epochs. Trained on the cached augmented views (feature mode); the epoch is chosen on val (the reference keeps
the last one).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from adapters.base import AdapterContext
from adapters.coop import CoOp

log = logging.getLogger(__name__)


def knowledge_loss(learned: torch.Tensor, handcrafted: torch.Tensor) -> torch.Tensor:
    """``1 - mean_c cos(learned_c, handcrafted_c)`` for ``[C, D]`` embeddings: 0 when they coincide."""
    return 1.0 - F.cosine_similarity(learned, handcrafted, dim=-1, eps=1e-7).mean()


class KgCoOp(CoOp):
    """CoOp with the knowledge-guided loss. Other arguments as ``CoOp``.

    Args:
        weight: lambda, the knowledge term's weight at logit scale ``weight_logit_scale``.
        weight_logit_scale: the logit scale ``weight`` was set at (CLIP's 100); the term is weighted
            ``weight x s / weight_logit_scale`` for the run's logit scale s (``knowledge_weight``). None: ``weight``.
    """

    def __init__(self, weight: float = 8.0, weight_logit_scale: float | None = 100.0, n_ctx: int = 4,
                 ctx_init: str = "a photo of a", **kwargs: Any) -> None:
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init, **kwargs)
        if weight_logit_scale is not None and not float(weight_logit_scale) > 0:
            raise ValueError(f"weight_logit_scale must be > 0 or null, got {weight_logit_scale}")
        self.weight = float(weight)
        self.weight_logit_scale = None if weight_logit_scale is None else float(weight_logit_scale)
        self.knowledge_weight = self.weight  # set for the run's logit scale by `setup`
        self._step_text: torch.Tensor | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        if self.weight_logit_scale is None:
            self.knowledge_weight = self.weight
        else:
            self.knowledge_weight = self.weight * float(ctx.logit_scale) / self.weight_logit_scale
        if self.knowledge_weight != self.weight:
            log.info("kgcoop: knowledge weight %.4g = %.4g x logit scale %.4g / %.4g", self.knowledge_weight,
                     self.weight, float(ctx.logit_scale), self.weight_logit_scale)

    def fit(self, train_set: Any, val: Any) -> dict[str, Any]:
        return {**super().fit(train_set, val), "knowledge_weight": self.knowledge_weight}

    def class_text_features(self) -> torch.Tensor:
        feats = super().class_text_features()
        # Kept for `loss`, so a training step runs the text encoder once, not twice.
        self._step_text = feats if self.training else None
        return feats

    def knowledge_term(self, learned: torch.Tensor | None = None) -> torch.Tensor:
        """``knowledge_weight * (1 - mean cos(w_c, t_c))``; ``learned [C, D]`` defaults to the current class
        embeddings."""
        learned = self.class_text_features() if learned is None else learned
        return self.knowledge_weight * knowledge_loss(learned, self.text_head)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[B, C], [B] -> scalar``: cross-entropy plus the knowledge-guided term."""
        learned, self._step_text = self._step_text, None
        return F.cross_entropy(logits, labels) + self.knowledge_term(learned)
