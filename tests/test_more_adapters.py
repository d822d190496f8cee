"""GDA, APE / APE-T, LP++, CLAP, TaskRes and KgCoOp against independent computations written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_features

from adapters.base import AdapterContext, FeatureSplit, SupportSet, accuracy
from adapters.gda import GDA
from adapters.zero_shot import ZeroShot

C, D = 6, 16


@pytest.fixture(scope="module")
def task():
    """Seeded synthetic task: separable classes, a weakly informative text head, 3 views per shot."""
    keys, labels, means = synthetic_features(C, 8, D, noise=0.2, seed=0)
    g = torch.Generator().manual_seed(1)
    views = F.normalize(keys[None] + 0.2 * torch.randn(3, *keys.shape, generator=g), dim=-1)
    text = F.normalize(means + 0.8 * torch.randn(C, D, generator=g), dim=-1)  # weakly informative, like CLIP
    val = FeatureSplit(*synthetic_features(C, 4, D, noise=0.2, seed=2, means=means)[:2])
    test = FeatureSplit(*synthetic_features(C, 30, D, noise=0.2, seed=3, means=means)[:2])
    support = SupportSet(keys=F.normalize(views.mean(0), dim=-1), labels=labels, views=views)
    return support, text, val, test


def _setup(adapter, support, text, seed=1, backbone=None, names=None):
    names = names or [f"c{i}" for i in range(text.shape[0])]
    adapter.setup(AdapterContext(classnames=names, text_head=text, support=support, seed=seed, progress=False,
                                 backbone=backbone))
    return adapter


def _zero_shot_accuracy(support, text, split):
    return accuracy(_setup(ZeroShot(), support, text).predict(split.features), split.labels)


class _Untouchable:
    """A validation split that fails the test if a method reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the validation split was used ({name})")

    def __len__(self):
        raise AssertionError("the validation split was used (len)")


# ---------------------------------------------------------------------------------------------------- GDA
def _numpy_gda(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means, the shrunk shared covariance of the reference, and the resulting (W, b), in numpy."""
    mu = np.stack([x[y == c].mean(axis=0) for c in range(C)])
    cov = np.cov((x - mu[y]).T)  # ddof 1, around the (zero) global mean of the class-centred samples
    precision = D * np.linalg.inv((len(x) - 1) * cov + np.trace(cov) * np.eye(D))
    w = mu @ precision
    b = np.log(1.0 / C) - 0.5 * np.einsum("cd,de,ce->c", mu, precision, mu)
    return w, b


def test_gda_matches_numpy_class_means_and_shrunk_covariance(task):
    support, text, _, test = task
    gda = _setup(GDA(alpha=0.7, search=False), support, text)
    # the cached views are the samples
    w, b = _numpy_gda(support.views.reshape(-1, D).double().numpy(), support.labels.repeat(3).numpy())
    np.testing.assert_allclose(gda.weight.numpy(), w, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gda.bias.numpy(), b, rtol=1e-4, atol=1e-3)
    f = test.features.double().numpy()
    expected = 100 * f @ text.double().numpy().T + 0.7 * (f @ w.T + b)
    np.testing.assert_allclose(gda.predict(test.features).numpy(), expected, rtol=1e-4, atol=1e-2)
    assert gda.state_dict() == {}  # training-free: nothing learned to save


def test_gda_without_views_fits_the_keys_and_alpha_zero_is_zero_shot(task):
    support, text, _, test = task
    no_views = SupportSet(keys=support.keys, labels=support.labels)
    gda = _setup(GDA(alpha=0.0, search=False), no_views, text)
    w, b = _numpy_gda(support.keys.double().numpy(), support.labels.numpy())
    np.testing.assert_allclose(gda.weight.numpy(), w, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gda.bias.numpy(), b, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gda.predict(test.features), _setup(ZeroShot(), support, text).predict(test.features))


def test_gda_searches_alpha_on_val_and_beats_zero_shot(task):
    support, text, val, test = task
    gda = _setup(GDA(), support, text)
    record = gda.tune(val)
    assert record["on"] == "val" and gda.alpha in gda.alpha_grid
    best = max(accuracy(100 * val.features @ text.t() + a * gda.gda_logits(val.features), val.labels)
               for a in gda.alpha_grid)
    assert record["val_acc"] == pytest.approx(best)
    assert accuracy(gda.predict(test.features), test.labels) > _zero_shot_accuracy(support, text, test) + 10
