"""Linear probe (Radford et al., 2021; CoOp's ``lpclip``): logistic regression on frozen image features.

scikit-learn's L-BFGS logistic regression is fitted on the support features (every cached augmented view is a
training sample) for each C in ``c_grid``; C is chosen on val (the CLIP paper searches C on a validation split
too). The fitted weights become a ``[C, D]`` linear layer, so prediction is a matmul.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet, accuracy

log = logging.getLogger(__name__)


class LinearProbe(Adapter):
    """Logistic regression on features. ``c_grid``: inverse regularisation strengths tried on val."""

    trainable = True
    cost = "trained on cached features (scikit-learn)"

    def __init__(self, c_grid: Sequence[float] = (0.001, 0.01, 0.1, 0.316, 1.0, 3.16, 10.0, 100.0),
                 max_iter: int = 1000) -> None:
        super().__init__()
        self.c_grid = [float(c) for c in c_grid]
        self.max_iter = int(max_iter)
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
        curve, best = [], None
        for c in self.c_grid:
            clf = LogisticRegression(C=c, max_iter=self.max_iter, random_state=self.ctx.seed)
            clf.fit(x, y)
            w, b = self._full_weights(clf, n_cls)
            self._load(w, b)
            acc = accuracy(self.predict(val.features), val.labels)
            curve.append(acc)
            if best is None or acc > best[0]:
                best = (acc, c, w, b)
        _, self.C, w, b = best
        self._load(w, b)
        return {"method": "grid over C", "on": "val", "val_acc_per_C": dict(zip(map(str, self.c_grid), curve)),
                "mode": "features (cached views as samples)"}

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
