"""Linear probe (Radford et al., 2021): logistic regression on frozen image features.

A multinomial logistic regression is fitted on the support features and C is chosen on val (the CLIP paper searches
C on a validation split too). The objective is scikit-learn's (``LogisticRegression(C=C)``, L2 penalty,
unpenalised intercept), divided by the number of samples N so that its scale does not grow with the data:

    f(W, b) = (1/N) sum_i CE(W x_i + b, y_i) + 1 / (2 C N) ||W||^2

**Solver.** Full-batch L-BFGS in torch, on the features' device (CUDA when present), with the loss and gradient
computed in row blocks (no ``[N, C]`` matrix lives at once). It replaces scikit-learn's lbfgs, which stops on an
absolute gradient tolerance (``tol=1e-4``): at 1,000 classes the gradient at zero is already below it, so
scikit-learn returned all-zero weights after 0 iterations, without a warning. Here the tolerance is relative to the
problem: stop when the largest gradient entry is below ``tol`` times its value at zero. Each fit is checked
(``training.check_optimised`` and ``check_classifier``): iterations run, loss below its value at zero, weights not
degenerate; a fit that hits ``max_iter`` (or stalls far from the tolerance) warns with its relative gradient.
Every fit is warm-started from the solution of the nearest C already fitted (the optimum is unique, so the start
changes the cost, not the answer).

**Samples** (``use_views``). ``auto`` (default) takes every cached augmented view as a sample while one pass over
them stays within ``gda.VIEW_BUDGET`` (2e10 multiply-adds, rows x D x classes), and the view-averaged keys above it:
at ImageNet scale (1,000 classes x 16 shots x 10 views, D = 1024) a pass over the views is a ``[160k, 1024] x
[1024, 1000]`` product, so each objective evaluation (forward and gradient) costs about 0.66 TFLOP and the C path
hundreds of them; the keys are 10x fewer rows and what the CLIP paper's probe fits (one un-augmented feature per
image). The choice and its figures are logged and recorded in ``result.json`` (``samples``); ``true`` / ``false``
force one.

Two searches:

- ``search: grid`` (fewclip's default): the C values of ``c_grid`` from the strongest regularisation (smallest C)
  up, the first best val accuracy wins. With ``patience`` > 0 the
  path stops once that many consecutive C values have not lowered the **val cross-entropy** (the large-C end is the
  slowest to fit: at ImageNet scale each full-batch evaluation multiplies a ``[160k, 1024]`` by a ``[1024, 1000]``
  matrix, seconds on a CPU). The stop watches the loss, not the accuracy: at the strongly regularised end the val
  accuracy of a few val images sits on a noisy plateau (17.5%, 20%, 17.5%, 17.5% for C = 1e-3 ... 0.316 with
  fewclip-mini's first weights on digits, where C = 100 reaches 45%), while the val loss falls steadily until the
  probe starts to overfit. ``patience: 0`` fits every C.
- ``search: lpclip``: CoOp's ``lpclip/linear_probe.py`` (KaiyangZhou/CoOp), the CLIP paper's appendix A.3 sweep:
  C from {1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6} (the first best on val), then ``lpclip_steps`` = 8 rounds of a
  binary search in log10(C) between 0.1 and 10 times the peak, each round fitting both ends and keeping the better
  (the left one on ties); the model of the last round is the result. lpclip fits on un-augmented features (the
  eval transform), which ``protocol=reference`` supplies (``conf/recipe/linear_probe.yaml``); it also draws its
  shots with numpy over 10 runs and uses the backbone's raw (unnormalised) features, which fewclip does not.

Classes without support samples get zero weights and a -1e4 bias, so they never win. With two classes the fit is
the symmetric softmax form, whose penalty on the logit difference is half scikit-learn's binary one (C here acts
as 2C there). The fitted weights become a ``[C, D]`` linear layer, so prediction is a matmul.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet, accuracy
from adapters.gda import check_use_views, resolve_views, support_samples
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


LPCLIP_INIT = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # CoOp lpclip/linear_probe.py, search_list


def lpclip_search(score: Callable[[float], float], steps: int = 8) -> tuple[float, list[tuple[float, float]]]:
    """CoOp lpclip's search for C: the best of ``LPCLIP_INIT``, then ``steps`` binary-search rounds in log10(C).

    Args:
        score: ``C -> val accuracy`` (called once per distinct C).
    Returns:
        the C kept by the last round and the ``(C, accuracy)`` trace in evaluation order.
    """
    seen: dict[float, float] = {}
    trace: list[tuple[float, float]] = []

    def acc(c: float) -> float:
        if c not in seen:
            seen[c] = score(c)
            trace.append((c, seen[c]))
        return seen[c]

    init = [acc(c) for c in LPCLIP_INIT]
    peak = LPCLIP_INIT[int(np.argmax(init))]  # first maximum, as np.argmax in the reference
    c_left, c_right = 0.1 * peak, 10.0 * peak
    final = peak
    for _ in range(steps):
        if acc(c_left) < acc(c_right):
            final = c_right
            lo, hi = 0.5 * (np.log10(c_right) + np.log10(c_left)), np.log10(c_right)
        else:
            final = c_left
            lo, hi = np.log10(c_left), 0.5 * (np.log10(c_right) + np.log10(c_left))
        c_left, c_right = float(np.power(10, lo)), float(np.power(10, hi))
    return final, trace


class LinearProbe(Adapter):
    """Multinomial logistic regression on features, C chosen on val.

    Args:
        c_grid: inverse regularisation strengths (scikit-learn's C) for ``search: grid``, fitted from the smallest up.
        max_iter: L-BFGS iterations per C.
        search: ``grid`` or ``lpclip`` (CoOp lpclip's initial sweep + binary search).
        lpclip_steps: rounds of the lpclip binary search.
        tol: relative gradient tolerance (largest gradient entry / its value at zero).
        patience: ``grid``: stop after this many C values without a lower val cross-entropy (0: fit every C).
        use_views: every cached augmented view is a sample (``true``), the view-averaged keys (``false``), or
            ``auto``: the views unless one pass over them costs more than ``gda.VIEW_BUDGET`` multiply-adds.
        chunk: rows per block when evaluating the objective.
    """

    trainable = True
    cost = "trained on cached features (full-batch L-BFGS)"

    def __init__(self, c_grid: Sequence[float] = (0.001, 0.01, 0.1, 0.316, 1.0, 3.16, 10.0, 100.0),
                 max_iter: int = 1000, search: str = "grid", lpclip_steps: int = 8, tol: float = 1e-4,
                 patience: int = 2, use_views: bool | str = "auto", chunk: int = 16384) -> None:
        super().__init__()
        if search not in ("grid", "lpclip"):
            raise ValueError(f"linear probe search must be grid or lpclip, got {search}")
        self.c_grid = sorted(float(c) for c in c_grid)
        if not self.c_grid or self.c_grid[0] <= 0:
            raise ValueError(f"linear_probe: c_grid must hold positive values, got {list(c_grid)}")
        self.max_iter, self.tol, self.patience = int(max_iter), float(tol), int(patience)
        self.search, self.lpclip_steps = search, int(lpclip_steps)
        self.use_views, self.chunk = check_use_views(use_views), int(chunk)
        self.C = self.c_grid[0]
        self.linear: nn.Linear | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        self.linear = nn.Linear(self.text_head.shape[1], ctx.n_classes).to(ctx.device)

    def hparams(self) -> dict[str, Any]:
        return {"C": self.C}

    @torch.no_grad()
    def estimate_fit_seconds(self, train_set: SupportSet, val: FeatureSplit, limit_s: float = math.inf) -> float:
        """One objective evaluation (timed) x ``EVALUATIONS_PER_C`` x the C values the search fits."""
        dev = self.text_head.device
        x, y = support_samples(train_set, resolve_views(self.use_views, train_set, self.ctx.n_classes)[0])
        k = int(torch.unique(y).numel())
        objective = LogisticObjective(x.float().to(dev), torch.unique(y, return_inverse=True)[1].to(dev), k,
                                      self.chunk)
        w = torch.zeros(k, x.shape[1], device=dev)
        start = time.perf_counter()
        objective(w, w.new_zeros(k))
        fits = len(LPCLIP_INIT) + 2 * self.lpclip_steps if self.search == "lpclip" else len(self.c_grid)
        return (time.perf_counter() - start) * EVALUATIONS_PER_C * fits

    def fit(self, train_set: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        """Fit the C values the search asks for (warm-started); keep the C the search chooses on val."""
        dev = self.text_head.device
        views, why = resolve_views(self.use_views, train_set, self.ctx.n_classes)
        log.info("linear_probe: %s samples (%s)", "view" if views else "key", why)
        x, y = support_samples(train_set, views)
        x, y = x.float().to(dev), y.to(dev)
        n_cls = self.ctx.n_classes
        present = torch.unique(y)  # scikit-learn's convention: fit the classes that have samples
        remap = torch.full((n_cls,), -1, dtype=torch.int64, device=dev)
        remap[present] = torch.arange(len(present), device=dev)
        objective = LogisticObjective(x, remap[y], len(present), self.chunk)
        k = len(present)
        zero = (x.new_zeros(k, x.shape[1]), x.new_zeros(k))
        loss0, gw0, gb0 = objective(*zero)  # at zero: log(k), the scale of the gradient tolerance
        grad0 = max(float(gw0.abs().max()), float(gb0.abs().max()))
        tol_grad = self.tol * grad0
        solutions: dict[float, dict[str, Any]] = {}

        def solve(c: float) -> dict[str, Any]:
            if c in solutions:
                return solutions[c]
            t = time.perf_counter()
            near = min(solutions, key=lambda f: abs(math.log(f / c)), default=None)  # warm start
            w0, b0 = (solutions[near]["w"], solutions[near]["b"]) if near is not None else zero
            objective.l2 = 1.0 / (c * objective.n)
            w, b, info = lbfgs(objective, w0, b0, tol_grad, self.max_iter)
            before = solutions[near]["path_iterations"] if near is not None else 0
            info.update(seconds=round(time.perf_counter() - t, 3), relative_grad=info["max_grad"] / grad0,
                        converged=info["max_grad"] <= tol_grad, warm_start=near,
                        path_iterations=info["iterations"] + before)
            # Short of the tolerance, a stop before max_iter means the line search found no lower loss (float32
            # precision near the optimum); only a stop far from it is a failure worth a warning.
            if not info["converged"] and (info["iterations"] >= self.max_iter or info["relative_grad"] > STALL_TOL):
                why = f"max_iter={self.max_iter}" if info["iterations"] >= self.max_iter else "a failed line search"
                message = (f"linear_probe: C={c:g} stopped at {why} before converging (largest gradient "
                           f"{info['relative_grad']:.2g} of its value at zero, tolerance {self.tol:g})")
                warnings.warn(message, NotOptimisedWarning, stacklevel=3)
                log.warning(message)
            solutions[c] = {**info, "w": w, "b": b}
            return solutions[c]

        val_loss: dict[float, float] = {}

        def score(c: float) -> float:
            sol = solve(c)
            self._load(*self._full_weights(sol["w"], sol["b"], present, n_cls))
            logits = self.predict(val.features)
            acc = accuracy(logits, val.labels)
            val_loss[c] = float(F.cross_entropy(logits.double(), val.labels.to(logits.device)))
            log.info("linear_probe: C=%g val %.2f%%, val loss %.4f (%d iterations, %.1f s, relative gradient %.2g)",
                     c, acc, val_loss[c], sol["iterations"], sol["seconds"], sol["relative_grad"])
            return acc

        if self.search == "lpclip":
            self.C, trace = lpclip_search(score, self.lpclip_steps)
            curve = {repr(c): a for c, a in trace}
            method, skipped = "lpclip (initial sweep + binary search over C)", []
        else:
            curve, best_acc, best_loss, since_best = {}, -1.0, math.inf, 0
            for c in self.c_grid:
                curve[str(c)] = score(c)
                if curve[str(c)] > best_acc:
                    best_acc, self.C = curve[str(c)], c
                if val_loss[c] < best_loss:
                    best_loss, since_best = val_loss[c], 0
                else:
                    since_best += 1
                    if self.patience and since_best >= self.patience:
                        break
            method = "C path (warm-started L-BFGS), best val accuracy; stopped by the val loss"
            skipped = [c for c in self.c_grid if str(c) not in curve]
        chosen = solutions[self.C]
        weight, bias = self._full_weights(chosen["w"], chosen["b"], present, n_cls)
        check_classifier("linear_probe", weight[present], bias[present])
        # From zero along the warm starts to the chosen C: the objective at zero is log(k), the uniform prediction.
        optimisation = check_optimised(f"linear_probe (C={self.C:g})", chosen["path_iterations"], loss0,
                                       chosen["loss"])
        self._load(weight, bias)
        fits = {repr(c): {k: v for k, v in sol.items() if k not in ("w", "b")} for c, sol in solutions.items()}
        return {"method": method, "on": "val", "val_acc_per_C": curve, "skipped_C": skipped, "fits": fits,
                "val_loss_per_C": {repr(c): v for c, v in val_loss.items()},
                "optimisation": optimisation,
                "mode": "features (cached views as samples)" if views else "features (one per image)",
                "samples": why}

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

