"""CLAP: class-adaptive linear probing (Silva-Rodriguez et al., "A Closer Look at the Few-Shot Adaptation of Large
Vision-Language Models", CVPR 2024; jusiro/CLAP ``trainers/adapters.py``, ``configs/trainers/SGD_lr1e-1_B256_ep300``,
``README.md``).

**ZS-LP.** A linear probe whose class prototypes w_c start at the zero-shot text embeddings t_c and are compared
to the image features by cosine, times CLIP's logit scale (exp(logit_scale) = 100):

    logits = 100 f . w_c / ||w_c||

so before any step its logits are the zero-shot logits.

**CLAP** adds a class-adaptive penalty keeping each prototype near its zero-shot anchor:

    L = CE + (1/C) sum_c lambda_c ||w_c - t_c||^2

It comes from the constrained problem "minimise CE subject to w_c = t_c", relaxed by an augmented Lagrangian
with one multiplier per class. Tuning the multipliers on a validation set would defeat the point (no validation
data in real few-shot use), so the multipliers are set once from the zero-shot model on the support set itself:
lambda_c = the mean zero-shot softmax probability of class c over class c's support samples. Classes zero-shot CLIP
already gets right are held near their text prototype; poorly recognised ones are free to move. This is the
published configuration (``CONSTRAINT l2`` in the README's commands): the multipliers stay fixed during training.
The repository also carries an experimental per-epoch outer update (``adaptative``: the PHR rule
lambda <- max(0, lambda + rho h), rho <- h, with h the current distances); ``adaptive: true`` enables it here, run at
the start of every epoch after the first (the reference runs it after every epoch; the update after the last epoch
changes nothing).

Training (the reference config): SGD lr 0.1, momentum 0.9, no weight decay, cosine, one warmup epoch at 1e-5,
batch 256, 300 epochs, the last epoch kept. The reference draws each epoch's batches from 20 augmented passes over
the support set; here each epoch takes one cached augmented view per support image, and the multipliers average
over all cached views. **No validation set**: ``fit`` never reads it and nothing is searched; the runner's val
accuracy is reporting only.

The multipliers are computed once per support set, in row blocks (``setup`` computes them; ``fit`` on the same set
reuses them).

Scale: the reference's prototypes and anchors are CLIP's raw, unnormalised text embeddings (``_get_base_text_
features``: the mean of the raw template embeddings), and so are they here: t_c = text_head_c * s_c with s_c the
raw norm the text store keeps (``AdapterContext.text_norms``; exact for a single template, CoOp's per-dataset
prompt). The logits are scale-invariant, but the dynamics are not: for raw norm s an SGD step on raw prototypes
equals a step of lr / s^2 on unit-norm ones, and the penalty lambda ||w - t||^2 equals lambda s^2 on unit-norm
prototypes, so unit-norm anchors would change both.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet
from adapters.gda import class_means, support_samples
from adapters.training import TrainsOnFeatures, train, view_batches

log = logging.getLogger(__name__)


class CLAP(TrainsOnFeatures, Adapter):
    """Zero-shot-initialised linear probe with the class-adaptive constraint.

    Args:
        constraint: ``l2`` (CLAP) or ``none`` (ZS-LP, the unconstrained probe).
        adaptive: per-epoch augmented-Lagrangian outer updates of the multipliers (the repository's experimental
            variant; off in the published configuration).
        **train_kwargs: ``TrainSpec`` fields (epochs, lr, ...). ``select`` is ignored: the last epoch is kept.
    """

    cost = "trained on cached features (no validation set)"

    def __init__(self, constraint: str = "l2", adaptive: bool = False, **train_kwargs: Any) -> None:
        super().__init__()
        if constraint not in ("l2", "none"):
            raise ValueError(f"constraint must be l2 or none, got {constraint}")
        self.constraint, self.adaptive = constraint, bool(adaptive)
        self.init_training(train_kwargs)
        self.prototypes: nn.Parameter | None = None
        self.register_buffer("anchors", torch.empty(0), persistent=False)  # raw zero-shot prototypes t [C, D]
        self.register_buffer("multipliers", torch.empty(0), persistent=False)
        self.register_buffer("penalty_weight", torch.empty(0), persistent=False)  # rho of the outer updates
        self._multipliers_from: SupportSet | None = None  # the support set the multipliers were computed on

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        self.anchors = self.text_head * ctx.raw_text_norms("CLAP").to(self.text_head.device)[:, None]
        self.prototypes = nn.Parameter(self.anchors.clone())
        self.init_multipliers(ctx.support)

    @torch.no_grad()
    def init_multipliers(self, support: SupportSet, chunk: int = 16384) -> None:
        """lambda_c = mean zero-shot probability of class c on its own support samples (every cached view): ``[C]``.

        Computed in row blocks (no ``[M, C]`` matrix), once per support set: ``fit`` on the set ``setup`` saw
        reuses it.
        """
        if self._multipliers_from is support:
            return
        x, y = support_samples(support)
        x, y = x.to(self.text_head.device), y.to(self.text_head.device)
        n_cls = self.text_head.shape[0]
        own = torch.empty(len(y), 1, device=x.device)
        for i in range(0, len(y), chunk):
            z = self.zero_shot_logits(x[i : i + chunk])  # [n, C]
            own[i : i + chunk, 0] = (z.gather(1, y[i : i + chunk, None])[:, 0] - torch.logsumexp(z, dim=1)).exp_()
        self.multipliers = class_means(own, y, n_cls)[:, 0]
        self.penalty_weight = torch.zeros_like(self.multipliers)
        self._multipliers_from = support

    def distances(self) -> torch.Tensor:
        """``||w_c - t_c||^2`` per class, on the raw embeddings: ``[C]``."""
        return (self.prototypes - self.anchors).pow(2).sum(dim=-1)

    def penalty(self) -> torch.Tensor:
        """The class-adaptive constraint term ``mean_c lambda_c ||w_c - t_c||^2`` (0 for ZS-LP)."""
        if self.constraint == "none":
            return self.prototypes.new_zeros(())
        return (self.multipliers * self.distances()).mean()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[B, C], [B] -> scalar``: cross-entropy plus the constraint."""
        return F.cross_entropy(logits, labels) + self.penalty()

    @torch.no_grad()
    def outer_step(self) -> None:
        """Augmented-Lagrangian (PHR) update: ``lambda <- max(0, lambda + rho h)``, ``rho <- h`` (h: distances)."""
        h = self.distances()
        self.multipliers = (self.multipliers + self.penalty_weight * h).clamp(min=0.0)
        self.penalty_weight = h.clone()

    def start_epoch(self, epoch: int) -> None:
        """Hook of ``training.train``: the outer update that closes the previous epoch."""
        if self.adaptive and self.constraint != "none" and epoch > 1:
            self.outer_step()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``: scaled cosine with the prototypes."""
        return self.logit_scale * x.float() @ F.normalize(self.prototypes, dim=-1).t()

    def fit(self, train_set: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        """Train on the support set only; ``val`` is never read (the last epoch is kept)."""
        self.init_multipliers(train_set)
        self._multipliers_from = None  # training (adaptive) changes them: a later fit starts afresh
        log.info("CLAP multipliers (zero-shot, support set): mean %.3f, min %.3f, max %.3f",
                 float(self.multipliers.mean()), float(self.multipliers.min()), float(self.multipliers.max()))
        record = train(self, view_batches(train_set, self.spec.batch_size, self.text_head.device), None, self.spec,
                       seed=self.ctx.seed, loss_fn=self.loss, progress=self.ctx.progress, desc=type(self).__name__)
        record["constraint"] = self.constraint
        record["multipliers"] = [round(float(v), 6) for v in self.multipliers]
        return record

    def tune(self, val: FeatureSplit) -> dict[str, Any]:
        """Nothing to search, and the validation split is not read."""
        return {"method": "none", "on": "none"}
