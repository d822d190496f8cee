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
from adapters.training import NonFiniteLossError, TrainSpec, train, view_batches
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


def test_linear_probe_matches_sklearn_and_learns(task):
    from sklearn.linear_model import LogisticRegression

    support, text, val, test = task
    lp = _setup(LinearProbe(c_grid=[0.01, 1.0, 100.0]), support, text)
    record = lp.fit(support, val)
    x = support.views.reshape(-1, D).numpy()
    y = support.labels.repeat(3).numpy()
    accs = {}
    for c in (0.01, 1.0, 100.0):
        clf = LogisticRegression(C=c, max_iter=1000, random_state=1).fit(x, y)
        accs[c] = 100 * float((clf.predict(val.features.numpy()) == val.labels.numpy()).mean())
    best_c = max(accs, key=lambda c: (accs[c], -list(accs).index(c)))
    assert lp.C == best_c
    clf = LogisticRegression(C=best_c, max_iter=1000, random_state=1).fit(x, y)
    np.testing.assert_allclose(lp.predict(test.features).numpy(), clf.decision_function(test.features.numpy()),
                               rtol=1e-4, atol=1e-4)
    assert accuracy(lp.predict(test.features), test.labels) > 100 / C + 40
    assert list(record["val_acc_per_C"].values()) == pytest.approx(list(accs.values()))


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
