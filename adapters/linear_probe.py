"""Linear probe (Radford et al., 2021; CoOp's ``lpclip``): logistic regression on frozen image features.

A multinomial logistic regression is fitted on the support features (every cached augmented view is a training
sample) for each C in ``c_grid``, and C is chosen on val (the CLIP paper searches C on a validation split too).
The objective is scikit-learn's (``LogisticRegression(C=C)``, L2 penalty, unpenalised intercept), divided by the
number of samples N so that its scale does not grow with the data:

    f(W, b) = (1/N) sum_i CE(W x_i + b, y_i) + 1 / (2 C N) ||W||^2

**Solver.** Full-batch L-BFGS in torch, on the features' device (CUDA when present), with the loss and gradient
computed in row blocks (no ``[N, C]`` matrix lives at once). It replaces scikit-learn's lbfgs, which stops on an
absolute gradient tolerance (``tol=1e-4``): at 1,000 classes the gradient at zero is already below it, so
scikit-learn returned all-zero weights after 0 iterations, without a warning. Here the tolerance is relative to the
problem: stop when the largest gradient entry is below ``tol`` times its value at zero. Each fit is checked
(``training.check_optimised`` and ``check_classifier``): iterations run, loss below its value at zero, weights not
degenerate; a fit that hits ``max_iter`` first warns with its relative gradient.

**The C path.** The C values are fitted from the strongest regularisation (smallest C) up, each warm-started from
the previous solution, which costs far fewer iterations than fitting each from zero. With ``patience`` > 0 the path
stops once that many consecutive C values have not improved the val accuracy (the val accuracy of a probe rises and
then falls with C; the large-C end is the slowest to fit): at ImageNet scale each full-batch evaluation multiplies
a ``[160k, 1024]`` by a ``[1024, 1000]`` matrix, seconds on a CPU. ``patience: 0`` fits every C.

Classes without support samples get zero weights and a -1e4 bias, so they never win. With two classes the fit is
the symmetric softmax form, whose penalty on the logit difference is half scikit-learn's binary one (C here acts
as 2C there).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet, accuracy
from adapters.gda import support_samples
from adapters.training import NotOptimisedWarning, check_classifier, check_optimised

log = logging.getLogger(__name__)

ABSENT_BIAS = -1e4  # classes with no support sample never win
EVALUATIONS_PER_C = 30  # cost model: objective evaluations per C along a warm-started path (measured: see README)
STALL_TOL = 1e-2  # a line-search stop with a relative gradient above this is a failure, not float32 precision


class LogisticObjective:
    """Mean multinomial cross-entropy + ``l2 / 2 ||W||^2`` over ``x [N, D]``, ``y [N]`` (labels in ``[0, K)``).

    ``__call__(w [K, D], b [K])`` returns the objective (float64) and its gradients, computed in blocks of
    ``chunk`` rows so that no ``[N, K]`` matrix is ever materialised.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n_classes: int, chunk: int = 16384) -> None:
        self.x, self.y, self.k, self.chunk = x, y, n_classes, int(chunk)
        self.n = x.shape[0]
        self.l2 = 0.0
        self.evals = 0

    def __call__(self, w: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        self.evals += 1
        gw, gb = torch.zeros_like(w), torch.zeros_like(b)
        total = 0.0
        for i in range(0, self.n, self.chunk):
            x, y = self.x[i : i + self.chunk], self.y[i : i + self.chunk]
            z = torch.addmm(b, x, w.t())  # [n, K]
            own = z.gather(1, y[:, None]).squeeze(1)
            top = z.amax(dim=1)
            p = z.sub_(top[:, None]).exp_()  # in place: no second [n, K] buffer
            mass = p.sum(dim=1, dtype=torch.float64)  # float64: the line search compares losses near the optimum
            total += float(((top - own).double() + mass.log()).sum())  # CE = logsumexp - own logit
            p.div_(mass.float()[:, None])  # softmax
            p[torch.arange(len(y), device=p.device), y] -= 1.0  # d CE / d z
            gw.addmm_(p.t(), x)
            gb += p.sum(dim=0)
        gw.div_(self.n).add_(w, alpha=self.l2)
        gb.div_(self.n)
        return total / self.n + 0.5 * self.l2 * float(w.double().pow(2).sum()), gw, gb


def lbfgs(objective: LogisticObjective, w: torch.Tensor, b: torch.Tensor, tol_grad: float, max_iter: int,
          history: int = 10) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Minimise ``objective`` from ``(w, b)`` with torch's L-BFGS (strong Wolfe line search).

    Stops when the largest gradient entry is at most ``tol_grad`` or after ``max_iter`` iterations.
    Returns the solution and ``{iterations, evaluations, loss, max_grad}``.
    """
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4 + 5,
                            tolerance_grad=tol_grad, tolerance_change=1e-12, history_size=history,
                            line_search_fn="strong_wolfe")
    last: dict[str, Any] = {}

    def closure() -> torch.Tensor:
        loss, gw, gb = objective(w.detach(), b.detach())
        w.grad, b.grad = gw, gb
        last.update(w=w.detach().clone(), b=b.detach().clone(), loss=loss,
                    max_grad=max(float(gw.abs().max()), float(gb.abs().max())))
        return torch.tensor(loss, dtype=torch.float64)  # float64: L-BFGS compares successive losses

    evals = objective.evals
    opt.step(closure)
    state = opt.state[opt.param_groups[0]["params"][0]]
    if not (torch.equal(last["w"], w.detach()) and torch.equal(last["b"], b.detach())):
        closure()  # the last evaluation was a rejected line-search point: evaluate the returned weights
    info = {"iterations": int(state.get("n_iter", 0)), "evaluations": objective.evals - evals,
            "loss": last["loss"], "max_grad": last["max_grad"]}
    return w.detach(), b.detach(), info


class LinearProbe(Adapter):
    """Multinomial logistic regression on features, C chosen on val.

    Args:
        c_grid: inverse regularisation strengths (scikit-learn's C), fitted from the smallest up.
        max_iter: L-BFGS iterations per C.
        tol: relative gradient tolerance (largest gradient entry / its value at zero).
        patience: stop the path after this many C values without a better val accuracy (0: fit every C).
        use_views: every cached augmented view is a sample (else the view-averaged keys).
        chunk: rows per block when evaluating the objective.
    """

    trainable = True
    cost = "trained on cached features (full-batch L-BFGS)"

    def __init__(self, c_grid: Sequence[float] = (0.001, 0.01, 0.1, 0.316, 1.0, 3.16, 10.0, 100.0),
                 max_iter: int = 1000, tol: float = 1e-4, patience: int = 2, use_views: bool = True,
                 chunk: int = 16384) -> None:
        super().__init__()
        self.c_grid = sorted(float(c) for c in c_grid)
        if not self.c_grid or self.c_grid[0] <= 0:
            raise ValueError(f"linear_probe: c_grid must hold positive values, got {list(c_grid)}")
        self.max_iter, self.tol, self.patience = int(max_iter), float(tol), int(patience)
        self.use_views, self.chunk = bool(use_views), int(chunk)
        self.C = self.c_grid[0]
        self.linear: nn.Linear | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        self.linear = nn.Linear(self.text_head.shape[1], ctx.n_classes).to(ctx.device)

    def hparams(self) -> dict[str, Any]:
        return {"C": self.C}

    @torch.no_grad()
    def estimate_fit_seconds(self, train_set: SupportSet, val: FeatureSplit, limit_s: float = math.inf) -> float:
        """One objective evaluation (timed) x ``EVALUATIONS_PER_C`` x the C values (warm-started L-BFGS)."""
        dev = self.text_head.device
        x, y = support_samples(train_set, self.use_views)
        k = int(torch.unique(y).numel())
        objective = LogisticObjective(x.float().to(dev), torch.unique(y, return_inverse=True)[1].to(dev), k,
                                      self.chunk)
        w = torch.zeros(k, x.shape[1], device=dev)
        start = time.perf_counter()
        objective(w, w.new_zeros(k))
        return (time.perf_counter() - start) * EVALUATIONS_PER_C * len(self.c_grid)

    def fit(self, train_set: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        """Fit the C path (warm-started); keep the C with the best val accuracy (the smaller C on ties)."""
        dev = self.text_head.device
        x, y = support_samples(train_set, self.use_views)
        x, y = x.float().to(dev), y.to(dev)
        n_cls = self.ctx.n_classes
        present = torch.unique(y)  # scikit-learn's convention: fit the classes that have samples
        remap = torch.full((n_cls,), -1, dtype=torch.int64, device=dev)
        remap[present] = torch.arange(len(present), device=dev)
        objective = LogisticObjective(x, remap[y], len(present), self.chunk)
        k = len(present)
        w, b = x.new_zeros(k, x.shape[1]), x.new_zeros(k)
        loss0, gw0, gb0 = objective(w, b)  # at zero: log(k), the scale of the gradient tolerance
        grad0 = max(float(gw0.abs().max()), float(gb0.abs().max()))
        tol_grad = self.tol * grad0
        curve: dict[str, float] = {}
        fits: dict[str, dict[str, Any]] = {}
        best, since_best, iterations = None, 0, 0
        for c in self.c_grid:
            t = time.perf_counter()
            objective.l2 = 1.0 / (c * objective.n)
            w, b, info = lbfgs(objective, w, b, tol_grad, self.max_iter)
            iterations += info["iterations"]
            info.update(seconds=round(time.perf_counter() - t, 3), relative_grad=info["max_grad"] / grad0,
                        path_iterations=iterations)
            fits[str(c)] = info
            info["converged"] = info["max_grad"] <= tol_grad
            # Short of the tolerance, a stop before max_iter means the line search found no lower loss (float32
            # precision near the optimum); only a stop far from it is a failure worth a warning.
            if not info["converged"] and (info["iterations"] >= self.max_iter or info["relative_grad"] > STALL_TOL):
                why = f"max_iter={self.max_iter}" if info["iterations"] >= self.max_iter else "a failed line search"
                message = (f"linear_probe: C={c:g} stopped at {why} before converging (largest gradient "
                           f"{info['relative_grad']:.2g} of its value at zero, tolerance {self.tol:g})")
                warnings.warn(message, NotOptimisedWarning, stacklevel=2)
                log.warning(message)
            self._load(*self._full_weights(w, b, present, n_cls))
            acc = accuracy(self.predict(val.features), val.labels)
            curve[str(c)] = acc
            log.info("linear_probe: C=%g val %.2f%% (%d iterations, %.1f s, relative gradient %.2g)", c, acc,
                     info["iterations"], info["seconds"], info["relative_grad"])
            if best is None or acc > best[0]:
                best, since_best = (acc, c, w.clone(), b.clone(), iterations, info["loss"]), 0
            else:
                since_best += 1
                if self.patience and since_best >= self.patience:
                    break
        acc, self.C, w, b, iterations, loss = best
        weight, bias = self._full_weights(w, b, present, n_cls)
        check_classifier("linear_probe", weight[present], bias[present])
        # From zero along the path to the chosen C: the objective at zero is log(k), the uniform prediction.
        optimisation = check_optimised(f"linear_probe (C={self.C:g})", iterations, loss0, loss)
        self._load(weight, bias)
        skipped = [c for c in self.c_grid if str(c) not in curve]
        return {"method": "C path (warm-started L-BFGS), best val accuracy", "on": "val", "val_acc_per_C": curve,
                "skipped_C": skipped, "fits": fits, "optimisation": optimisation,
                "mode": "features (cached views as samples)" if self.use_views else "features (keys)"}

    @staticmethod
    def _full_weights(w: torch.Tensor, b: torch.Tensor, present: torch.Tensor, n_cls: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        weight = w.new_zeros(n_cls, w.shape[1])
        bias = w.new_full((n_cls,), ABSENT_BIAS)
        weight[present], bias[present] = w, b
        return weight, bias

    def _load(self, w: torch.Tensor, b: torch.Tensor) -> None:
        with torch.no_grad():
            self.linear.weight.copy_(w)
            self.linear.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        return F.linear(x.float(), self.linear.weight, self.linear.bias)

