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
is a sample (``use_views``), which leaves the step sizes' scale unchanged (both grow with M). ``use_views: auto``
(default) takes the view-averaged keys instead when one pass over the views exceeds ``gda.VIEW_BUDGET`` (2e10
multiply-adds, rows x D x classes; ImageNet's 160,000 views at D = 1024 are 1.6e11), recorded as ``samples``.

Cost: each epoch is two ``M x D x C`` matmuls (the logits ``f (W + diag(alpha) T)^T + b`` and ``G^T F``, from which
both the W and the alpha gradients follow), computed in row blocks with the gradients written out by hand, so no
``[M, C]`` matrix is kept (autograd kept four). The initial point is computed once (in ``setup``; ``fit`` on the
same support set starts from it), and its step sizes come from the ``[D, D]`` Gram matrix. The val features' text
cosines are computed once, not every epoch. At ImageNet scale with the 10 views (M = 160,000) the 300 epochs are
~2e14 FLOPs: tens of minutes on a 2-core CPU; the keys (what ``auto`` takes there) are 10x less.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet, accuracy
from adapters.gda import check_use_views, class_means, resolve_views, support_samples
from adapters.tip import class_sum
from adapters.training import NonFiniteLossError, check_classifier, check_optimised

log = logging.getLogger(__name__)


def lp_pp_init(x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, init_scale: float = 250.0
               ) -> dict[str, Any]:
    """LP++'s initial point and step sizes from the samples ``x [M, D]``, ``labels [M]`` and ``text [C, D]``.

    Returns ``weight [C, D]`` (per-class feature sums), ``alpha`` (a float), ``lr_w`` and ``lr_alpha`` (floats).
    Both step sizes come from the Gram matrix ``F^T F [D, D]``: ``lambda_max`` for W, and for alpha
    ``sum_i (f_i . t_k)^2 = t_k F^T F t_k``, so no ``[M, C]`` matrix is formed.
    """
    n_cls, m = text.shape[0], x.shape[0]
    weight = class_sum(x.t(), labels, n_cls).t()  # [C, D]
    own = (x * text[labels]).sum(dim=1, keepdim=True)  # [M, 1]: f_i . t_{y_i}
    alpha = init_scale * float(class_means(own, labels, n_cls).mean())
    gram = (x.t() @ x).double()  # [D, D]
    lam_max = float(torch.linalg.eigvalsh(gram)[-1])
    lr_w = 4.0 * m / lam_max
    t = text.double()
    lr_alpha = m / (4.0 * float(((t @ gram) * t).sum(dim=1).max()))
    return {"weight": weight, "alpha": alpha, "lr_w": lr_w, "lr_alpha": lr_alpha}


class LPPlusPlus(Adapter):
    """LP++ linear probe, full batch on the support features.

    Args:
        epochs: full-batch iterations (the reference's ``train_epoch: 300``).
        alpha_every: W steps per alpha step (10 in the reference).
        init_scale: the 250 of the alpha initialisation.
        momentum: SGD momentum of the W block.
        alpha_grad: ``accumulated`` (the reference) or ``current`` gradient for the alpha steps.
        use_views: every cached augmented view is a sample (``true``), the view-averaged keys (``false``), or
            ``auto``: the views unless one pass over them costs more than ``gda.VIEW_BUDGET`` multiply-adds.
        select: ``best_val`` (the epoch with the best val accuracy, later epoch on ties) or ``last``.
    """

    trainable = True
    cost = "trained on cached features (full batch)"

    def __init__(self, epochs: int = 300, alpha_every: int = 10, init_scale: float = 250.0, momentum: float = 0.9,
                 alpha_grad: str = "accumulated", use_views: bool | str = "auto", select: str = "best_val") -> None:
        super().__init__()
        if alpha_grad not in ("accumulated", "current") or select not in ("best_val", "last"):
            raise ValueError(f"alpha_grad must be accumulated|current and select best_val|last, got {alpha_grad}, "
                             f"{select}")
        self.epochs, self.alpha_every, self.init_scale = int(epochs), int(alpha_every), float(init_scale)
        self.momentum, self.alpha_grad = float(momentum), alpha_grad
        self.use_views, self.select = check_use_views(use_views), select
        self.lr_w = self.lr_alpha = 0.0
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        self.alpha: nn.Parameter | None = None
        self._fresh_from: SupportSet | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        self.initialise(*support_samples(ctx.support, self._views(ctx.support)[0]))
        self._fresh_from = ctx.support  # fit on this support starts here instead of initialising again

    def initialise(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Set the initial point and step sizes from the samples ``x [M, D]``, ``labels [M]``."""
        dev = self.text_head.device
        init = lp_pp_init(x.float().to(dev), labels.to(dev), self.text_head, self.init_scale)
        n_cls = self.text_head.shape[0]
        self.weight = nn.Parameter(init["weight"])
        self.bias = nn.Parameter(torch.zeros(n_cls, device=dev))
        self.alpha = nn.Parameter(torch.full((n_cls,), init["alpha"], device=dev))
        self.lr_w, self.lr_alpha = init["lr_w"], init["lr_alpha"]
        self._fresh_from = None

    def logits(self, x: torch.Tensor, text_logits: torch.Tensor) -> torch.Tensor:
        """``f W^T + b + alpha * (f t^T)`` given ``text_logits = f t^T``: ``[B, D], [B, C] -> [B, C]``."""
        return torch.addmm(self.bias, x, self.weight.t()) + self.alpha * text_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        x = x.float()
        return self.logits(x, x @ self.text_head.t())

    @torch.no_grad()
    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 16384
                       ) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over ``x [M, D]``, ``y [M]`` and its gradients for W ``[C, D]``, b ``[C]``, alpha ``[C]``.

        The logits are ``f (W + diag(alpha) T)^T + b``: one matmul per row block. With ``G = softmax - onehot``,
        the W gradient is ``G^T F / M`` and the alpha gradient ``sum_d (G^T F)_kd T_kd / M``: both from the same
        ``[C, D]`` product, so an epoch costs two ``M x D x C`` matmuls and no ``[M, C]`` matrix is kept.
        """
        w_eff = torch.addcmul(self.weight, self.alpha[:, None], self.text_head)  # [C, D]
        g_raw, g_b = torch.zeros_like(self.weight), torch.zeros_like(self.bias)
        total = 0.0
        for i in range(0, x.shape[0], chunk):
            xi, yi = x[i : i + chunk], y[i : i + chunk]
            z = torch.addmm(self.bias, xi, w_eff.t())  # [n, C]
            own = z.gather(1, yi[:, None]).squeeze(1)
            top = z.amax(dim=1)
            p = z.sub_(top[:, None]).exp_()
            mass = p.sum(dim=1)
            total += float(((top - own) + mass.log()).double().sum())
            p.div_(mass[:, None])
            p[torch.arange(len(yi), device=p.device), yi] -= 1.0
            g_raw.addmm_(p.t(), xi)
            g_b += p.sum(dim=0)
        m = x.shape[0]
        return total / m, g_raw / m, g_b / m, (g_raw * self.text_head).sum(dim=1) / m

    @torch.no_grad()
    def estimate_fit_seconds(self, train_set: SupportSet, val: FeatureSplit, limit_s: float = math.inf) -> float:
        """``epochs`` x one full-batch loss and gradient (timed) plus a val evaluation when selecting on val."""
        dev = self.text_head.device
        x, y = support_samples(train_set, self._views(train_set)[0])
        start = time.perf_counter()
        self.loss_and_grads(x.float().to(dev), y.to(dev))
        per_epoch = time.perf_counter() - start
        if self.select == "best_val" and val is not None and len(val) > 0:
            per_epoch += self.estimate_eval_seconds(val)
        return self.epochs * per_epoch

    def fit(self, train_set: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        """Block-coordinate descent, full batch; keep the best val epoch (or the last)."""
        dev = self.text_head.device
        views, why = self._views(train_set)
        log.info("LP++: %s samples (%s)", "view" if views else "key", why)
        x, y = support_samples(train_set, views)
        x, y = x.float().to(dev), y.to(dev)
        if self._fresh_from is not train_set:  # setup already initialised from this support set
            self.initialise(x, y)
        self._fresh_from = None
        opt = torch.optim.SGD([self.weight, self.bias], lr=self.lr_w, momentum=self.momentum)
        grad_sum = torch.zeros_like(self.alpha)
        select_on_val = self.select == "best_val" and val is not None and len(val) > 0
        if select_on_val:  # constant: the val features' text cosines, computed once
            val_x, val_y = val.features.float().to(dev), val.labels.to(dev)
            val_text = val_x @ self.text_head.t()
        best_acc, best_epoch, best_state = -1.0, self.epochs, None
        losses: list[float] = []
        val_accs: list[float] = []
        start = self.weight.detach().clone()
        self.train()
        for epoch in range(1, self.epochs + 1):
            loss, g_w, g_b, g_alpha = self.loss_and_grads(x, y)
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"LP++: non-finite loss ({loss}) at epoch {epoch}")
            self.weight.grad, self.bias.grad = g_w, g_b
            opt.step()
            grad_sum = grad_sum + g_alpha if self.alpha_grad == "accumulated" else g_alpha
            if epoch % self.alpha_every == 0:
                with torch.no_grad():
                    self.alpha -= self.lr_alpha * grad_sum
            losses.append(loss)
            if select_on_val:
                with torch.no_grad():
                    acc = accuracy(self.logits(val_x, val_text), val_y)
                val_accs.append(acc)
                if acc >= best_acc:  # the reference's >=: ties keep the later epoch
                    best_acc, best_epoch = acc, epoch
                    best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        optimisation = check_optimised("LP++", len(losses), losses[0] if losses else float("nan"),
                                       losses[-1] if losses else float("nan"),
                                       moved=float((self.weight.detach() - start).abs().max()))
        if best_state is not None:
            self.load_state_dict(best_state)
        check_classifier("LP++", torch.addcmul(self.weight, self.alpha[:, None], self.text_head), self.bias)
        self.eval()
        log.info("LP++: %d epochs, lr_w=%.4g lr_alpha=%.4g, kept epoch %d", self.epochs, self.lr_w, self.lr_alpha,
                 best_epoch)
        return {"method": "LP++ block-coordinate descent (full batch)", "epochs": self.epochs,
                "best_epoch": best_epoch, "selected_by": "val" if select_on_val else "last", "lr_w": self.lr_w,
                "lr_alpha": self.lr_alpha, "train_loss": losses, "val_acc": val_accs, "optimisation": optimisation,
                "mode": "features (cached views as samples)" if views else "features (keys)", "samples": why}

    def _views(self, support: SupportSet) -> tuple[bool, str]:
        return resolve_views(self.use_views, support, self.text_head.shape[0])
