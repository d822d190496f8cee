"""Gaussian discriminant analysis on CLIP features, training-free (Wang et al., "A Hard-to-Beat Baseline for
Training-free CLIP-based Adaptation", ICLR 2024; mrflogs/ICLR24 ``main_few_shots.py``).

Each class is a Gaussian with its own mean and one covariance shared by all classes. Bayes' rule then gives a
linear classifier on the image features f:

    W = mu Sigma^-1                                   [C, D]
    b_c = log p_c - 1/2 mu_c Sigma^-1 mu_c^T          [C]   (uniform prior p_c = 1/C, as the reference)
    logits = 100 f t^T + alpha (f W^T + b)

The covariance is the reference's shrinkage estimate: with S the within-class scatter matrix of the N samples
(sum of the outer products of the class-centred samples) and Sigma_hat = S / (N - 1) the sample covariance,

    Sigma^-1 = D (S + tr(Sigma_hat) I)^-1,

i.e. the scatter shrunk toward a multiple of the identity, which keeps it invertible when N < D. The reference
takes a pseudo-inverse; the matrix is positive definite, so this module solves the linear system in float64.

Samples: the reference encodes every support image under 10 random augmentations (``augment_epoch: 10``) and fits
on all of them; here the support store's cached views play that role (``use_views``), and the view-averaged keys
are used when the store keeps no views. The class sums and the Gram matrix are accumulated in one float64 pass over
the samples (the within-class scatter is the Gram matrix minus the class means' part). alpha is searched on val
only, over the reference's grid {1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100} (first best). The reference searches ImageNet's
alpha on its test split; fewclip never does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from adapters.base import Adapter, AdapterContext, SupportSet
from adapters.tip import class_sum
from adapters.training import check_classifier

log = logging.getLogger(__name__)

ALPHA_GRID = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


# Multiply-adds of one pass over the samples (rows x D x classes) above which ``use_views: auto`` fits the
# view-averaged keys. An iterative fit (linear probe, LP++) makes hundreds of such passes, forward and backward:
# 2e10 is about 0.5 s per pass on one CPU core. 100 classes x 16 shots x 10 views at D = 1024 is 1.6e9 (views);
# ImageNet's 1,000 x 16 x 10 at D = 1024 is 1.6e11 (keys: 1.6e10).
VIEW_BUDGET = 2e10


def check_use_views(use_views: bool | str) -> bool | str:
    """``use_views`` as given, once checked: ``True``, ``False`` or ``"auto"`` (see ``resolve_views``)."""
    if isinstance(use_views, str) and use_views.lower() != "auto":
        raise ValueError(f"use_views must be true, false or auto, got {use_views!r}")
    return use_views


def resolve_views(use_views: bool | str, support: SupportSet, n_classes: int, budget: float | None = None
                  ) -> tuple[bool, str]:
    """Whether an iterative fit takes every cached view as a sample, and why.

    ``use_views``: ``True`` / ``False``, or ``"auto"``: the views when ``views x images x D x n_classes`` is at
    most ``budget`` multiply-adds (default ``VIEW_BUDGET``), else the view-averaged keys. A store with fewer than
    two views gives the keys whatever ``use_views`` says. Returns ``(use the views, reason)``.
    """
    check_use_views(use_views)
    if support.views is None or support.views.shape[0] <= 1:
        return False, "the store keeps no views"
    if not isinstance(use_views, str):
        return bool(use_views), "use_views=" + str(bool(use_views)).lower()
    budget = VIEW_BUDGET if budget is None else float(budget)
    a, n, d = support.views.shape
    cost = float(a) * n * d * n_classes
    if cost <= budget:
        return True, f"auto: {a} views x {n} images x D {d} x {n_classes} classes = {cost:.2g} <= {budget:.2g}"
    return False, (f"auto: {a} views x {n} images x D {d} x {n_classes} classes = {cost:.2g} multiply-adds per "
                   f"pass > {budget:.2g}: the view-averaged keys ({n} rows; use_views=true forces the views)")


def support_samples(support: SupportSet, use_views: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Training samples of a support set: every cached view when there are views (and ``use_views``), else the keys.

    Returns ``([M, D] float32 features, [M] labels)`` with ``M = A * N`` for ``A`` views (view-major order).
    """
    if use_views and support.views is not None:
        views = support.views.float()
        return views.reshape(-1, views.shape[-1]), support.labels.repeat(views.shape[0])
    return support.keys.float(), support.labels


def class_means(x: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-class mean of ``x [M, D]``: ``[C, D]`` (zero for a class without samples)."""
    sums = class_sum(x.t(), labels, n_classes).t()
    counts = torch.bincount(labels.to(x.device), minlength=n_classes).clamp(min=1)
    return sums / counts[:, None].to(x.dtype)


def gda_classifier(x: torch.Tensor, labels: torch.Tensor, n_classes: int, chunk: int = 16384
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the shared-covariance Gaussian model and return its linear classifier.

    Args:
        x: ``[M, D]`` samples; labels: ``[M]``; chunk: samples per float64 block.
    Returns:
        ``(W [C, D], b [C])`` float32, with ``W = mu Sigma^-1`` and ``b = log(1/C) - 1/2 diag(mu Sigma^-1 mu^T)``.
    """
    # float64: the scatter of many unit vectors in 1024-D loses digits in float32. One pass over the samples in
    # blocks (so ImageNet's 16 shots x 10 views x 1000 classes never exist as one float64 copy) accumulates the
    # per-class sums and the Gram matrix; the within-class scatter is then sum_i x_i x_i^T - sum_c n_c mu_c mu_c^T.
    n, d = x.shape
    labels = labels.to(x.device)
    sums = x.new_zeros(n_classes, d, dtype=torch.float64)
    gram = x.new_zeros(d, d, dtype=torch.float64)
    for i in range(0, n, chunk):
        xd = x[i : i + chunk].double()
        sums.index_add_(0, labels[i : i + chunk], xd)
        gram.addmm_(xd.t(), xd)
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).double()
    mu = sums / counts[:, None]  # [C, D]
    # (N - 1) * sample covariance of the class-centred samples (their global mean is 0)
    scatter = gram - (sums.t() / counts) @ sums
    shrink = torch.trace(scatter) / max(n - 1, 1)  # tr(Sigma_hat)
    regularised = scatter + shrink * torch.eye(d, dtype=torch.float64, device=x.device)
    # Sigma^-1 mu^T = D * regularised^-1 mu^T, by a solve rather than an explicit inverse.
    precision_mu = d * torch.linalg.solve(regularised, mu.t())  # [D, C]
    weight = precision_mu.t()  # mu Sigma^-1 (Sigma is symmetric)
    log_prior = -torch.log(torch.tensor(float(n_classes), dtype=torch.float64))
    bias = log_prior - 0.5 * (weight * mu).sum(dim=1)
    return weight.float(), bias.float()


class GDA(Adapter):
    """Training-free GDA classifier ensembled with zero-shot CLIP.

    Args:
        alpha: weight of the GDA logits (overwritten by the search when ``search``).
        search: choose alpha on val from ``alpha_grid``.
        alpha_grid: the reference's grid.
        use_views: fit on every cached augmented view (the reference's 10 augmented passes) instead of the keys.
    """

    def __init__(self, alpha: float = 0.1, search: bool = True, alpha_grid: Sequence[float] = ALPHA_GRID,
                 use_views: bool = True) -> None:
        super().__init__()
        self.alpha, self.search, self.use_views = float(alpha), bool(search), bool(use_views)
        self.alpha_grid = [float(a) for a in alpha_grid]
        self.register_buffer("weight", torch.empty(0), persistent=False)
        self.register_buffer("bias", torch.empty(0), persistent=False)

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        x, y = support_samples(ctx.support, self.use_views)
        w, b = gda_classifier(x.to(ctx.device), y.to(ctx.device), ctx.n_classes)
        check_classifier("gda", w, b)
        self.weight, self.bias = w, b
        log.info("GDA: fitted on %d samples (%s)", len(y), "cached views" if len(y) > len(ctx.support) else "keys")

    def hparam_grid(self) -> dict[str, list[float]]:
        return {"alpha": self.alpha_grid} if self.search else {}

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def gda_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``f W^T + b``: ``[B, D] -> [B, C]``."""
        return x.float() @ self.weight.t() + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``: zero-shot logits + alpha * GDA logits."""
        return torch.add(self.zero_shot_logits(x), self.gda_logits(x), alpha=self.alpha)
