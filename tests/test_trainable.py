"""The shared training loop and the feature-mode trainable adapters, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import feature_task

from adapters.base import AdapterContext, accuracy
from adapters.clip_adapter import ClipAdapter
from adapters.linear_probe import LinearProbe
from adapters.tip import TipAdapter
from adapters.tip_f import TipAdapterF
from adapters.training import (
    DegenerateFitError,
    NonFiniteLossError,
    NotOptimisedWarning,
    TrainSpec,
    check_classifier,
    check_optimised,
    train,
    view_batches,
)
from adapters.zero_shot import ZeroShot

C, D = 6, 16


@pytest.fixture(scope="module")
def task():
    return feature_task(C, D)


def _setup(adapter, support, text, seed=1):
    adapter.setup(AdapterContext(classnames=[f"c{i}" for i in range(C)], text_head=text, support=support,
                                 seed=seed, progress=False))
    return adapter


def test_tip_f_before_training_equals_tip(task):
    support, text, _, test = task
    tip = _setup(TipAdapter(alpha=1.7, beta=4.0, search=False), support, text)
    tip_f = _setup(TipAdapterF(alpha=1.7, beta=4.0, search=False), support, text)
    torch.testing.assert_close(tip_f.predict(test.features), tip.predict(test.features))
    assert set(tip_f.state_dict()) == {"keys"}  # only the learned cache, no backbone, no text head


def test_tip_f_train_at_search_trains_where_the_training_free_search_lands(task):
    """train_at=search: (beta, alpha) come from a val search of the untrained cache (the training-free Tip-Adapter's,
    run here independently), training runs there, and the record says so; fixed trains at the given values."""
    support, text, val, _ = task
    grid = dict(grid="log", beta_max=300.0, alpha_max=300.0, beta_steps=12, alpha_steps=6)
    tip = _setup(TipAdapter(**grid), support, text)
    tip.tune(val)
    seen = []

    class Probe(TipAdapterF):
        def loss(self, logits, labels):
            seen.append((self.beta, self.alpha))
            return super().loss(logits, labels)

    tip_f = _setup(Probe(train_at="search", epochs=2, **grid), support, text)
    record = tip_f.fit(support, val)
    assert record["train_at"]["beta"] == tip.beta and record["train_at"]["alpha"] == tip.alpha
    assert seen and set(seen) == {(tip.beta, tip.alpha)}
    seen.clear()
    fixed = _setup(Probe(train_at="fixed", alpha=1.7, beta=4.0, epochs=2, **grid), support, text)
    assert "train_at" not in fixed.fit(support, val) and set(seen) == {(4.0, 1.7)}
    with pytest.raises(ValueError, match="train_at"):
        TipAdapterF(train_at="later")


def test_train_at_search_falls_back_when_the_support_loss_is_zero(task, caplog):
    """A searched point where the cache recalls its own support set (support loss exactly 0, no gradient) is not
    trained at: the configured (beta, alpha) are, with a warning and the reason in the record."""
    from adapters.base import SupportSet
    from adapters.tip import support_loss

    support, text, val, _ = task
    own = SupportSet(keys=support.keys, labels=support.labels, views=support.keys[None])  # views = keys
    sharp = dict(grid="log", beta_min=1000.0, beta_max=1000.0, beta_steps=1, alpha_min=1000.0, alpha_max=1000.0,
                 alpha_steps=1)  # the search can only land on beta = alpha = 1000
    tip = _setup(TipAdapter(alpha=1000.0, beta=1000.0, search=False), own, text)
    logits = tip(own.keys).double()  # independent: the loss written out
    expected = float((torch.logsumexp(logits, dim=1) - logits.gather(1, own.labels[:, None])[:, 0]).mean())
    assert expected == 0.0 and support_loss(tip, own) == expected
    tip_f = _setup(TipAdapterF(train_at="search", alpha=1.7, beta=4.0, epochs=2, **sharp), own, text)
    with caplog.at_level("WARNING", logger="adapters.tip"):
        record = tip_f.fit(own, val)
    assert record["train_at"]["beta"] == 1000.0 and record["train_at"]["fallback"]["beta"] == 4.0
    assert record["train_at"]["fallback"]["alpha"] == 1.7 and "support loss" in caplog.text
    assert record["optimisation"]["status"] == "ok"  # trained at (4, 1.7): the keys moved
    # Where the support loss is not 0, training runs at the searched point (no fallback).
    soft = _setup(TipAdapterF(train_at="search", epochs=3, **{**sharp, "beta_min": 1.0, "beta_max": 1.0,
                                                             "alpha_min": 1.0, "alpha_max": 1.0}), support, text)
    assert support_loss(soft, support) > 0 and "fallback" not in soft.fit(support, val)["train_at"]


def test_clip_adapter_ratio_zero_is_zero_shot(task):
    support, text, _, test = task
    ca = _setup(ClipAdapter(ratio=0.0, search=False), support, text)
    zs = _setup(ZeroShot(), support, text)
    torch.testing.assert_close(ca.predict(test.features), zs.predict(test.features))
    # and the residual formula, computed here
    ca.ratio = 0.3
    h = F.relu(F.relu(test.features @ ca.mlp[0].weight.t()) @ ca.mlp[2].weight.t())
    expected = 100 * F.normalize(0.3 * h + 0.7 * test.features, dim=-1) @ text.t()
    torch.testing.assert_close(ca.predict(test.features), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: TipAdapterF(epochs=15, lr=0.01, beta_steps=10, alpha_steps=10, alpha_max=20.0),
    lambda: ClipAdapter(epochs=200, lr=0.01, batch_size=16),
], ids=["tip_f", "clip_adapter"])
def test_trainable_adapters_learn_the_task(task, make):
    support, text, val, test = task
    adapter = _setup(make(), support, text)
    chance = 100.0 / C
    zs = accuracy(_setup(ZeroShot(), support, text).predict(test.features), test.labels)
    record = adapter.fit(support, val)
    adapter.tune(val)
    assert record["train_loss"][-1] < record["train_loss"][0]
    acc = accuracy(adapter.predict(test.features), test.labels)
    assert acc > chance + 40 and acc > zs + 10
    assert record["selected_by"] == "val" and 1 <= record["best_epoch"] <= adapter.spec.epochs


def _sklearn_objective(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """scikit-learn's L2 logistic regression objective, C * sum CE + 1/2 ||W||^2 (intercept not penalised)."""
    return c * F.cross_entropy(x @ w.t() + b, y, reduction="sum") + 0.5 * w.pow(2).sum()


def test_linear_probe_matches_sklearn_and_learns(task):
    from sklearn.linear_model import LogisticRegression

    support, text, val, test = task
    lp = _setup(LinearProbe(c_grid=[0.01, 1.0, 100.0], tol=1e-6, patience=0), support, text)
    record = lp.fit(support, val)
    x = support.views.reshape(-1, D)
    y = support.labels.repeat(3)
    accs = {}
    for c in (0.01, 1.0, 100.0):
        clf = LogisticRegression(C=c, max_iter=10000, tol=1e-8, random_state=1).fit(x.numpy(), y.numpy())
        accs[c] = 100 * float((clf.predict(val.features.numpy()) == val.labels.numpy()).mean())
    best_c = max(accs, key=lambda c: (accs[c], -list(accs).index(c)))
    assert lp.C == best_c
    assert list(record["val_acc_per_C"].values()) == pytest.approx(list(accs.values()))
    clf = LogisticRegression(C=best_c, max_iter=10000, tol=1e-8, random_state=1).fit(x.numpy(), y.numpy())
    # The optimum is unique: the probe sits at it (autograd gradient of the objective written here is ~0) and is
    # at least as low as scikit-learn's solution, whose logits it matches.
    w = lp.linear.weight.detach().clone().double().requires_grad_(True)
    b = lp.linear.bias.detach().clone().double().requires_grad_(True)
    value = _sklearn_objective(w, b, x.double(), y, best_c)
    grads = torch.autograd.grad(value, [w, b])
    w0 = torch.zeros_like(w, requires_grad=True)
    zero = torch.autograd.grad(_sklearn_objective(w0, torch.zeros_like(b), x.double(), y, best_c), w0)[0]
    assert max(float(g.abs().max()) for g in grads) < 1e-4 * float(zero.abs().max())
    sk_w, sk_b = torch.from_numpy(clf.coef_).double(), torch.from_numpy(clf.intercept_).double()
    sk = _sklearn_objective(sk_w, sk_b, x.double(), y, best_c)
    assert float(value.detach()) <= float(sk) + 1e-6 * abs(float(sk))
    np.testing.assert_allclose(lp.predict(test.features).numpy(), clf.decision_function(test.features.numpy()),
                               rtol=1e-3, atol=1e-3)
    assert accuracy(lp.predict(test.features), test.labels) > 100 / C + 40
    assert record["optimisation"]["status"] == "ok" and record["optimisation"]["iterations"] > 0


def test_linear_probe_path_stops_on_the_val_loss_not_on_an_accuracy_plateau(task, monkeypatch):
    """A flat val accuracy (the noisy plateau of strongly regularised probes) must not end the C path while the
    val cross-entropy still falls; two C values past the val-loss minimum it stops."""
    import adapters.linear_probe as lp_module

    support, text, val, _ = task
    grid = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4]
    monkeypatch.setattr(lp_module, "accuracy", lambda logits, labels: 50.0)  # the plateau
    lp = _setup(LinearProbe(c_grid=grid, tol=1e-6, patience=2), support, text)
    record = lp.fit(support, val)
    # The val loss of each fitted C, recomputed here from scikit-learn's solution of the same objective.
    from sklearn.linear_model import LogisticRegression

    x, y = support.views.reshape(-1, D).numpy(), support.labels.repeat(3).numpy()
    fitted = [c for c in grid if repr(c) in record["fits"]]
    losses = []
    for c in fitted:
        clf = LogisticRegression(C=c, max_iter=10000, tol=1e-8).fit(x, y)
        logits = torch.from_numpy(clf.decision_function(val.features.numpy()))
        losses.append(float(F.cross_entropy(logits, val.labels)))
    best = int(np.argmin(losses))
    assert len(fitted) > 3, f"stopped on the accuracy plateau after {fitted}"
    assert fitted == grid[: min(best + 3, len(grid))], (fitted, losses)
    assert lp.C == grid[0]  # equal accuracies: the first (most regularised) wins


def test_training_is_seeded_and_selects_on_val_only(task):
    support, text, val, _ = task
    a = _setup(ClipAdapter(epochs=5, lr=0.01, search=False), support, text)
    b = _setup(ClipAdapter(epochs=5, lr=0.01, search=False), support, text)
    ra, rb = a.fit(support, val), b.fit(support, val)
    assert ra["train_loss"] == rb["train_loss"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    # best_val keeps the epoch whose val accuracy is highest (first on ties)
    assert ra["best_epoch"] == 1 + int(np.argmax(ra["val_acc"]))
    # the kept weights are that epoch's: re-evaluating gives the recorded val accuracy
    assert accuracy(a.predict(val.features), val.labels) == ra["val_acc"][ra["best_epoch"] - 1]


def test_last_epoch_selection_and_view_sampling(task):
    support, text, val, _ = task
    a = _setup(ClipAdapter(epochs=3, lr=0.01, search=False, select="last"), support, text)
    rec = a.fit(support, val)
    assert rec["selected_by"] == "last" and rec["best_epoch"] == 3
    seen = []
    for x, y in view_batches(support, batch_size=10)(1, torch.Generator().manual_seed(0)):
        assert x.shape[1] == D and len(x) == len(y) <= 10
        seen += y.tolist()
    assert sorted(seen) == sorted(support.labels.tolist())  # each support image once per epoch


def test_non_finite_loss_stops_with_a_clear_error(task):
    support, text, val, _ = task
    a = _setup(ClipAdapter(epochs=2), support, text)
    spec = TrainSpec(epochs=2, lr=0.1)
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        train(a, view_batches(support, 16), val, spec, seed=0, loss_fn=lambda lo, y: lo.sum() * float("nan"),
              progress=False)


def test_unknown_training_hyperparameter_is_rejected():
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        ClipAdapter(learning_rate=0.1)


def test_use_views_auto_takes_the_keys_above_the_budget(task, monkeypatch):
    import adapters.gda as gda
    from adapters.base import SupportSet
    from adapters.lp_pp import LPPlusPlus

    # ImageNet's shape (views x images x D x classes = 1.6e11) is over the default budget, a mid dataset's is not.
    imagenet = SupportSet(keys=torch.zeros(1, 1), labels=torch.zeros(1, dtype=torch.long),
                          views=torch.zeros(1, 1, 1).expand(10, 16_000, 1024))  # shape only
    assert gda.resolve_views("auto", imagenet, 1000)[0] is False
    assert gda.resolve_views("auto", imagenet, 100)[0] is True  # 1.6e10
    assert gda.resolve_views(True, imagenet, 1000)[0] is True
    no_views = SupportSet(keys=imagenet.keys, labels=imagenet.labels)  # a store without views: the keys, always
    assert gda.resolve_views(True, no_views, 10) == (False, "the store keeps no views")
    with pytest.raises(ValueError, match="true, false or auto"):
        gda.resolve_views("views", imagenet, 10)
    with pytest.raises(ValueError, match="true, false or auto"):
        LinearProbe(use_views="sometimes")
    support, text, val, _ = task
    a, n, d = support.views.shape
    monkeypatch.setattr(gda, "VIEW_BUDGET", a * n * d * C - 1)  # one multiply-add short of the views
    for make, pick in ((lambda v: LinearProbe(c_grid=[1.0], use_views=v), lambda m: m.linear.weight),
                       (lambda v: LPPlusPlus(epochs=5, use_views=v), lambda m: m.weight)):
        auto, keys = _setup(make("auto"), support, text), _setup(make(False), support, text)
        record = auto.fit(support, val)
        keys.fit(support, val)
        assert record["samples"].startswith("auto:") and "view-averaged keys" in record["samples"]
        torch.testing.assert_close(pick(auto), pick(keys))  # the same fit as use_views=false
    monkeypatch.setattr(gda, "VIEW_BUDGET", a * n * d * C)  # exactly the views' cost: within the budget
    views, auto = _setup(LinearProbe(c_grid=[1.0], use_views=True), support, text), \
        _setup(LinearProbe(c_grid=[1.0]), support, text)
    views.fit(support, val)
    assert auto.fit(support, val)["mode"] == "features (cached views as samples)"
    torch.testing.assert_close(auto.linear.weight, views.linear.weight)


def test_linear_probe_at_1000_classes_learns_a_task_with_a_known_answer():
    # 1,000 classes (where scikit-learn's absolute tolerance stopped at iteration 0 with all-zero weights): class
    # centres + noise, so the best achievable accuracy is the nearest-true-centre rule's, computed here.
    from conftest import synthetic_features

    from adapters.base import FeatureSplit, SupportSet

    n_cls, dim = 1000, 64
    keys, labels, means = synthetic_features(n_cls, 4, dim, noise=0.2, seed=0)
    val = FeatureSplit(*synthetic_features(n_cls, 1, dim, noise=0.2, seed=1, means=means)[:2])
    test = FeatureSplit(*synthetic_features(n_cls, 3, dim, noise=0.2, seed=2, means=means)[:2])
    oracle = accuracy(test.features @ means.t(), test.labels)
    support = SupportSet(keys=keys, labels=labels)
    text = F.normalize(torch.randn(n_cls, dim, generator=torch.Generator().manual_seed(3)), dim=-1)  # uninformative
    ctx = AdapterContext(classnames=[f"c{i}" for i in range(n_cls)], text_head=text, support=support, progress=False)
    lp = LinearProbe(c_grid=[0.1, 10.0])
    lp.setup(ctx)
    record = lp.fit(support, val)
    acc = accuracy(lp.predict(test.features), test.labels)
    # 4 shots cannot reach the oracle; the nearest mean of the shots is the few-shot yardstick
    shot_means = F.normalize(torch.zeros(n_cls, dim).index_add_(0, labels, keys), dim=-1)
    nearest_mean = accuracy(test.features @ shot_means.t(), test.labels)
    assert oracle > 80 and nearest_mean > 30 and acc > nearest_mean - 5  # chance is 0.1%
    opt = record["optimisation"]
    assert opt["iterations"] > 0 and opt["final_loss"] < opt["initial_loss"] == pytest.approx(np.log(n_cls))
    # A solver that is not allowed to iterate returns the all-zero classifier: refused, with the figures.
    stuck = LinearProbe(c_grid=[1.0], max_iter=0)
    stuck.setup(ctx)
    with pytest.raises(DegenerateFitError, match="same weights"):
        stuck.fit(support, val)


def test_optimisation_checks_fire_with_the_figures():
    with pytest.raises(DegenerateFitError, match="no iteration"):
        check_optimised("x", 0, 2.3, 2.3)
    with pytest.raises(DegenerateFitError, match="never changed"):
        check_optimised("x", 5, 2.3, 2.2, moved=0.0)
    with pytest.raises(DegenerateFitError, match="non-finite"):
        check_optimised("x", 5, 2.3, float("nan"))
    with pytest.warns(NotOptimisedWarning, match=r"did not decrease \(5 iterations, loss 2.3 -> 2.4"):
        rec = check_optimised("x", 5, 2.3, 2.4, moved=0.1)
    assert rec["status"].startswith("warning")
    assert check_optimised("x", 5, 2.3, 1.0)["status"] == "ok"
    with pytest.raises(DegenerateFitError, match="NaN or infinite"):
        check_classifier("x", torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(DegenerateFitError, match="same weights"):
        check_classifier("x", torch.ones(3, 4), torch.zeros(3))
    check_classifier("x", torch.ones(3, 4), torch.tensor([0.0, 0.0, 1.0]))  # the bias separates them: fine


def test_training_that_cannot_move_is_refused(task):
    support, text, val, _ = task
    a = _setup(ClipAdapter(epochs=2, lr=0.0, search=False), support, text)
    with pytest.raises(DegenerateFitError, match="never changed"):
        a.fit(support, val)
    b = _setup(ClipAdapter(epochs=1, search=False), support, text)
    b.spec.epochs = 0
    with pytest.raises(DegenerateFitError, match="no iteration"):
        b.fit(support, val)
