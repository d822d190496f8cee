"""CLAP and TaskRes start from the raw (unnormalised) text embeddings, as their reference code does: one training
step here equals the reference's update written out by hand (numpy, float64) on a tiny example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.base import AdapterContext, SupportSet
from adapters.clap import CLAP
from adapters.taskres import TaskRes

C, D, K = 3, 5, 2
SCALE = 100.0


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1)
    norms = torch.tensor([6.0, 9.5, 3.25])  # raw norms far from 1, different per class
    labels = torch.arange(C).repeat_interleave(K)
    keys = torch.nn.functional.normalize(text[labels] + 0.9 * torch.randn(C * K, D, generator=g), dim=-1)
    return text, norms, SupportSet(keys=keys, labels=labels)  # no views: every epoch is one batch of the keys


def _setup(adapter, text, norms, support):
    adapter.setup(AdapterContext(classnames=[f"c{i}" for i in range(C)], text_head=text, support=support,
                                 progress=False, text_norms=norms))
    return adapter


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ce_grad_wrt_unnormalised(u, f, y):
    """d mean-CE(100 f . u_c / ||u_c||) / d u, for u [C, D], f [B, D], y [B] (by the chain rule, by hand)."""
    norm = np.linalg.norm(u, axis=1, keepdims=True)
    uhat = u / norm
    p = _softmax(SCALE * f @ uhat.T)
    onehot = np.eye(C)[y]
    g_hat = SCALE * (p - onehot).T @ f / len(y)  # d/d uhat
    # d uhat / d u = (I - uhat uhat^T) / ||u||
    return (g_hat - (g_hat * uhat).sum(axis=1, keepdims=True) * uhat) / norm


def test_taskres_first_adam_step_on_raw_embeddings(tiny):
    text, norms, support = tiny
    lr, alpha, wd = 2e-3, 0.5, 5e-4
    tr = _setup(TaskRes(residual_scale=alpha, weight_decay_l2=wd, epochs=1, batch_size=64, optimizer="adamw",
                        lr=lr, betas=[0.9, 0.999], schedule="constant", select="last"), text, norms, support)
    tr.fit(support, None)
    t = text.double().numpy() * norms.double().numpy()[:, None]  # the reference's raw base_text_features
    f, y = support.keys.double().numpy(), support.labels.numpy()
    g = alpha * _ce_grad_wrt_unnormalised(t, f, y) + wd * 0.0  # Dassl's coupled decay: wd * x, x = 0 at step 1
    # torch.optim.Adam, step 1: m_hat = g, v_hat = g^2, x = -lr * m_hat / (sqrt(v_hat) + eps)
    expected = -lr * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(tr.residual.detach().double().numpy(), expected, rtol=1e-4, atol=1e-9)
    # the classifier moved by the raw-norm-scaled residual: normalize(t + alpha x)
    w = t + alpha * expected
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(tr.classifier().detach().double().numpy(), w, rtol=1e-5, atol=1e-6)
    # on a unit-norm head the same residual would turn the classifier s times further: the norms matter
    unit = text.double().numpy() + alpha * expected
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    assert np.abs(unit - text.double().numpy()).max() > 2 * np.abs(w - text.double().numpy()).max()


def test_clap_two_sgd_steps_on_raw_embeddings(tiny):
    text, norms, support = tiny
    lr, mom = 0.1, 0.9
    clap = _setup(CLAP(epochs=2, batch_size=64, optimizer="sgd", lr=lr, momentum=mom, weight_decay=0.0,
                       schedule="constant"), text, norms, support)
    t = text.double().numpy() * norms.double().numpy()[:, None]
    np.testing.assert_allclose(clap.prototypes.detach().double().numpy(), t, rtol=1e-6)
    clap.fit(support, None)
    f, y = support.keys.double().numpy(), support.labels.numpy()
    # multipliers: mean zero-shot probability of each class on its own support samples (scale-invariant logits)
    p0 = _softmax(SCALE * f @ text.double().numpy().T)
    lam = np.array([p0[y == c, c].mean() for c in range(C)])

    def grad(w):
        return _ce_grad_wrt_unnormalised(w, f, y) + lam[:, None] * 2.0 * (w - t) / C  # + d mean_c lam ||w-t||^2

    g1 = grad(t)
    w1 = t - lr * g1  # SGD with momentum, step 1: buffer = g1
    buf = mom * g1 + grad(w1)
    w2 = w1 - lr * buf
    np.testing.assert_allclose(clap.prototypes.detach().double().numpy(), w2, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(clap.multipliers.double().numpy(), lam, rtol=1e-5)
    # the penalty acts on raw distances: at w2 it equals mean_c lam_c ||w2_c - t_c||^2 with t at raw norm
    assert float(clap.penalty().detach()) == pytest.approx(float((lam * ((w2 - t) ** 2).sum(1)).mean()), rel=1e-4)
