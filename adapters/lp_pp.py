"""LP++ (Huang et al., "LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP", CVPR 2024;
FereshteShakeri/FewShot-CLIP-Strong-Baseline ``methods/linear_probe_p2.py``, ``configs/base.yaml``).

A linear probe whose class weights blend visual prototypes with the text embeddings through class-wise multipliers:

    logits_ik = f_i . w_k + b_k + alpha_k (f_i . t_k)

trained full-batch on the M support samples by block-coordinate descent with step sizes set from the data instead
of tuned (the paper derives them from Lipschitz bounds of the cross-entropy's gradient in each block):

    W block (W, b): SGD with momentum 0.9, step  eta_W     = 4 M / lambda_max(F^T F)
    alpha block:    a gradient step every 10 W steps, eta_alpha = M / (4 max_k sum_i (f_i . t_k)^2)

Initialisation, as the reference: w_k = the *sum* of class k's features (``compute_centroids``), b = 0 (the
reference keeps ``nn.Linear``'s random bias, drawn from the global RNG; zero is the deterministic choice), and every
alpha_k = 250 * mean over classes c of the mean text cosine f . t_c of class c's samples (``calculate_init_alpha``).

The reference never clears alpha's gradient, so each alpha step uses the sum of the gradients since the start;
``alpha_grad: accumulated`` (default) reproduces that, ``current`` takes the plain block-gradient step. The
reference trains 300 epochs and reports the test accuracy at the epoch with the best val accuracy (ties: the later
epoch); here ``select: best_val`` keeps that epoch's weights (chosen on val, never on test), ``last`` keeps the last.

Samples: the reference encodes each support image once under random augmentation; here every cached augmented view
is a sample (``use_views``), which leaves the step sizes' scale unchanged (both grow with M).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet, evaluate
from adapters.gda import class_means, support_samples
from adapters.tip import class_sum
from adapters.training import NonFiniteLossError

log = logging.getLogger(__name__)


def lp_pp_init(x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, init_scale: float = 250.0
               ) -> dict[str, Any]:
    """LP++'s initial point and step sizes from the samples ``x [M, D]``, ``labels [M]`` and ``text [C, D]``.

    Returns ``weight [C, D]`` (per-class feature sums), ``alpha`` (a float), ``lr_w`` and ``lr_alpha`` (floats).
    """
    n_cls, m = text.shape[0], x.shape[0]
    text_logits = x @ text.t()  # [M, C]
    weight = class_sum(x.t(), labels, n_cls).t()  # [C, D]
    own = text_logits.gather(1, labels[:, None].to(x.device))  # [M, 1]: f_i . t_{y_i}
    alpha = init_scale * float(class_means(own, labels, n_cls).mean())
    lam_max = float(torch.linalg.eigvalsh((x.t() @ x).double())[-1])
    lr_w = 4.0 * m / lam_max
    lr_alpha = m / (4.0 * float((text_logits ** 2).sum(dim=0).max()))
    return {"weight": weight, "alpha": alpha, "lr_w": lr_w, "lr_alpha": lr_alpha}


class LPPlusPlus(Adapter):
    """LP++ linear probe, full batch on the support features.

    Args:
        epochs: full-batch iterations (the reference's ``train_epoch: 300``).
        alpha_every: W steps per alpha step (10 in the reference).
        init_scale: the 250 of the alpha initialisation.
        momentum: SGD momentum of the W block.
        alpha_grad: ``accumulated`` (the reference) or ``current`` gradient for the alpha steps.
        use_views: every cached augmented view is a sample (else the view-averaged keys).
        select: ``best_val`` (the epoch with the best val accuracy, later epoch on ties) or ``last``.
    """

    trainable = True
    cost = "trained on cached features (full batch)"

    def __init__(self, epochs: int = 300, alpha_every: int = 10, init_scale: float = 250.0, momentum: float = 0.9,
                 alpha_grad: str = "accumulated", use_views: bool = True, select: str = "best_val") -> None:
        super().__init__()
        if alpha_grad not in ("accumulated", "current") or select not in ("best_val", "last"):
            raise ValueError(f"alpha_grad must be accumulated|current and select best_val|last, got {alpha_grad}, "
                             f"{select}")
        self.epochs, self.alpha_every, self.init_scale = int(epochs), int(alpha_every), float(init_scale)
        self.momentum, self.alpha_grad = float(momentum), alpha_grad
        self.use_views, self.select = bool(use_views), select
        self.lr_w = self.lr_alpha = 0.0
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        self.alpha: nn.Parameter | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        self.initialise(*support_samples(ctx.support, self.use_views))

    def initialise(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Set the initial point and step sizes from the samples ``x [M, D]``, ``labels [M]``."""
        dev = self.text_head.device
        init = lp_pp_init(x.float().to(dev), labels.to(dev), self.text_head, self.init_scale)
        n_cls = self.text_head.shape[0]
        self.weight = nn.Parameter(init["weight"])
        self.bias = nn.Parameter(torch.zeros(n_cls, device=dev))
        self.alpha = nn.Parameter(torch.full((n_cls,), init["alpha"], device=dev))
        self.lr_w, self.lr_alpha = init["lr_w"], init["lr_alpha"]

    def logits(self, x: torch.Tensor, text_logits: torch.Tensor) -> torch.Tensor:
        """``f W^T + b + alpha * (f t^T)`` given ``text_logits = f t^T``: ``[B, D], [B, C] -> [B, C]``."""
        return torch.addmm(self.bias, x, self.weight.t()) + self.alpha * text_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        x = x.float()
        return self.logits(x, x @ self.text_head.t())

    def fit(self, train_set: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        """Block-coordinate descent, full batch; keep the best val epoch (or the last)."""
        dev = self.text_head.device
        x, y = support_samples(train_set, self.use_views)
        x, y = x.float().to(dev), y.to(dev)
        self.initialise(x, y)
        text_logits = x @ self.text_head.t()  # constant: computed once
        opt = torch.optim.SGD([self.weight, self.bias], lr=self.lr_w, momentum=self.momentum)
        grad_sum = torch.zeros_like(self.alpha)
        select_on_val = self.select == "best_val" and val is not None and len(val) > 0
        best_acc, best_epoch, best_state = -1.0, self.epochs, None
        losses: list[float] = []
        val_accs: list[float] = []
        for epoch in range(1, self.epochs + 1):
            self.train()
            loss = F.cross_entropy(self.logits(x, text_logits), y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"LP++: non-finite loss ({loss.item()}) at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            self.alpha.grad = None
            loss.backward()
            opt.step()
            grad_sum = grad_sum + self.alpha.grad if self.alpha_grad == "accumulated" else self.alpha.grad
            if epoch % self.alpha_every == 0:
                with torch.no_grad():
                    self.alpha -= self.lr_alpha * grad_sum
            losses.append(float(loss.detach()))
            if select_on_val:
                acc = evaluate(self, val)
                val_accs.append(acc)
                if acc >= best_acc:  # the reference's >=: ties keep the later epoch
                    best_acc, best_epoch = acc, epoch
                    best_state = copy.deepcopy({k: v.detach().clone() for k, v in self.state_dict().items()})
        if best_state is not None:
            self.load_state_dict(best_state)
        self.eval()
        log.info("LP++: %d epochs, lr_w=%.4g lr_alpha=%.4g, kept epoch %d", self.epochs, self.lr_w, self.lr_alpha,
                 best_epoch)
        return {"method": "LP++ block-coordinate descent (full batch)", "epochs": self.epochs,
                "best_epoch": best_epoch, "selected_by": "val" if select_on_val else "last", "lr_w": self.lr_w,
                "lr_alpha": self.lr_alpha, "train_loss": losses, "val_acc": val_accs,
                "mode": "features (cached views as samples)" if self.use_views else "features (keys)"}
