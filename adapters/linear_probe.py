"""Linear probe (Radford et al., 2021): logistic regression on frozen image features.

scikit-learn's L-BFGS logistic regression is fitted on the support features and C is chosen on val. Two searches:

- ``search: grid`` (fewclip's default): one fit per C in ``c_grid``, the first best on val wins; every cached
  augmented view is a training sample.
- ``search: lpclip``: CoOp's ``lpclip/linear_probe.py`` (KaiyangZhou/CoOp), the CLIP paper's appendix A.3 sweep:
  C from {1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6} (the first best on val), then ``lpclip_steps`` = 8 rounds of a
  binary search in log10(C) between 0.1 and 10 times the peak, each round fitting both ends and keeping the better
  (the left one on ties); the model of the last round is the result. lpclip fits on un-augmented features (the
  eval transform), which ``protocol=reference`` supplies (``conf/recipe/linear_probe.yaml``); it also draws its
  shots with numpy over 10 runs and uses the backbone's raw (unnormalised) features, which fewclip does not.

The fitted weights become a ``[C, D]`` linear layer, so prediction is a matmul.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet, accuracy

log = logging.getLogger(__name__)


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
    """Logistic regression on features.

    Args:
        c_grid: inverse regularisation strengths tried on val (``search: grid``).
        search: ``grid`` or ``lpclip`` (CoOp lpclip's initial sweep + binary search).
        lpclip_steps: rounds of the lpclip binary search.
    """

    trainable = True
    cost = "trained on cached features (scikit-learn)"

    def __init__(self, c_grid: Sequence[float] = (0.001, 0.01, 0.1, 0.316, 1.0, 3.16, 10.0, 100.0),
                 max_iter: int = 1000, search: str = "grid", lpclip_steps: int = 8) -> None:
        super().__init__()
        if search not in ("grid", "lpclip"):
            raise ValueError(f"linear probe search must be grid or lpclip, got {search}")
        self.c_grid = [float(c) for c in c_grid]
        self.max_iter = int(max_iter)
        self.search, self.lpclip_steps = search, int(lpclip_steps)
        self.C = self.c_grid[0]
        self.linear: nn.Linear | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        self.linear = nn.Linear(self.text_head.shape[1], ctx.n_classes).to(ctx.device)

    def hparams(self) -> dict[str, Any]:
        return {"C": self.C}

    def fit(self, train_set: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        """Fit one model per C; keep the one with the best val accuracy (first best on ties)."""
        from sklearn.linear_model import LogisticRegression

        views = train_set.views if train_set.views is not None else train_set.keys[None]
        x = views.reshape(-1, views.shape[-1]).float().numpy()
        y = train_set.labels.repeat(views.shape[0]).numpy()
        n_cls = self.ctx.n_classes
        mode = "features (cached views as samples)" if views.shape[0] > 1 else "features (one per image)"
        fitted: dict[float, tuple[np.ndarray, np.ndarray]] = {}

        def score(c: float) -> float:
            clf = LogisticRegression(C=c, max_iter=self.max_iter, random_state=self.ctx.seed)
            clf.fit(x, y)
            fitted[c] = self._full_weights(clf, n_cls)
            self._load(*fitted[c])
            return accuracy(self.predict(val.features), val.labels)

        if self.search == "lpclip":
            self.C, trace = lpclip_search(score, self.lpclip_steps)
            self._load(*fitted[self.C])
            return {"method": "lpclip (initial sweep + binary search over C)", "on": "val",
                    "val_acc_per_C": {repr(c): a for c, a in trace}, "mode": mode}
        curve, best_acc = [], -1.0
        for c in self.c_grid:
            curve.append(score(c))
            if curve[-1] > best_acc:
                best_acc, self.C = curve[-1], c
        self._load(*fitted[self.C])
        return {"method": "grid over C", "on": "val", "val_acc_per_C": dict(zip(map(str, self.c_grid), curve)),
                "mode": mode}

    @staticmethod
    def _full_weights(clf: Any, n_cls: int) -> tuple[np.ndarray, np.ndarray]:
        # scikit-learn only knows the classes it saw; absent classes get -inf-like bias so they never win.
        d = clf.coef_.shape[1]
        w, b = np.zeros((n_cls, d), dtype=np.float32), np.full(n_cls, -1e4, dtype=np.float32)
        coef, inter = clf.coef_, clf.intercept_
        if len(clf.classes_) == 2:  # binary: one row for class 1 against class 0
            coef, inter = np.vstack([-coef, coef]) / 2, np.array([-inter[0], inter[0]]) / 2
        w[clf.classes_], b[clf.classes_] = coef, inter
        return w, b

    def _load(self, w: np.ndarray, b: np.ndarray) -> None:
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(w))
            self.linear.bias.copy_(torch.from_numpy(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        return self.linear(x.float())
