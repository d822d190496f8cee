"""GDA, APE / APE-T, LP++, CLAP, TaskRes and KgCoOp against independent computations written here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import feature_task, prompt_task

from adapters.ape import APE, APET
from adapters.base import AdapterContext, SupportSet, accuracy
from adapters.clap import CLAP
from adapters.coop import CoOp
from adapters.gda import GDA, gda_classifier
from adapters.kgcoop import KgCoOp
from adapters.lp_pp import LPPlusPlus
from adapters.taskres import TaskRes
from adapters.tip import TipAdapter
from adapters.tuning import grid_search
from adapters.zero_shot import ZeroShot

C, D = 6, 16


@pytest.fixture(scope="module")
def task():
    return feature_task(C, D)


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
    # accumulated in blocks that do not divide the samples: the same classifier
    w7, b7 = gda_classifier(support.views.reshape(-1, D), support.labels.repeat(3), C, chunk=7)
    torch.testing.assert_close((w7, b7), (gda.weight, gda.bias))
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


# ---------------------------------------------------------------------------------------------------- APE
def _small_cache(seed=0, n_cls=3, shots=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(n_cls, dim, generator=g), dim=-1)
    keys = F.normalize(torch.randn(n_cls * shots, dim, generator=g), dim=-1)
    labels = torch.arange(n_cls).repeat_interleave(shots)
    return text, keys, labels


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.2, 0.8)])
def test_ape_refined_channels_follow_the_criterion_computed_by_hand(weights):
    text, keys, labels = _small_cache(seed=3)
    # scramble the label order: the criterion must not assume a class-ordered cache
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    keys, labels = keys[perm], labels[perm]
    n_cls, dim = text.shape
    samples = [[text[c].double().numpy()] + [k.double().numpy() for k in keys[labels == c]] for c in range(n_cls)]
    sim, count = np.zeros(dim), 0
    for i, j in itertools.product(range(n_cls), repeat=2):
        if i != j:
            for a in samples[i]:
                for b in samples[j]:
                    sim += a * b
                    count += 1
    criterion = -weights[0] * sim / count + weights[1] * text.double().numpy().var(axis=0, ddof=1)
    ape = _setup(APE(channel_ratio=5 / 8, criterion_weights=weights, search=False), SupportSet(keys, labels), text)
    assert sorted(ape.channels.tolist()) == sorted(np.argsort(-criterion)[:5].tolist())


def test_ape_logits_hand_computed():
    text, keys, labels = _small_cache(seed=5)
    ape = _setup(APE(alpha=1.5, beta=3.0, gamma=0.4, channel_ratio=6 / 8, search=False), SupportSet(keys, labels),
                 text)
    ch = ape.channels.numpy()
    q = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(9)), dim=-1)

    def refine(v):
        v = v.double().numpy()[:, ch]
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    kr, tr, qr = refine(keys), refine(text), refine(q)
    expected = 100 * q.double().numpy() @ text.double().numpy().T
    for n in range(len(labels)):
        cos = kr[n] @ tr.T
        p = np.exp(cos) / np.exp(cos).sum()
        kl = np.log2((1 + 1e-6) / (p[labels[n]] + 1e-6))  # one-hot target: only its own class contributes
        for b in range(len(q)):
            expected[b, labels[n]] += 1.5 * np.exp(-3.0 * (1 - qr[b] @ kr[n])) * np.exp(0.4 * kl)
    np.testing.assert_allclose(ape.predict(q).numpy(), expected, rtol=1e-5, atol=1e-4)


def test_ape_search_equals_the_plain_grid_loop_in_the_reference_order(task):
    support, text, val, _ = task
    kw = dict(beta_max=6.0, alpha_max=5.0, gamma_max=2.0, beta_steps=6, alpha_steps=5, gamma_steps=4)
    fast, slow = _setup(APE(**kw), support, text), _setup(APE(**kw), support, text)
    rec = fast.tune(val)
    rec_slow = grid_search(slow, val)  # beta, alpha, gamma nested in that order: the reference's loops
    assert fast.hparams() == slow.hparams()
    assert rec["val_acc"] == rec_slow["val_acc"] == accuracy(fast.predict(val.features), val.labels)
    assert rec["grid_size"] == 6 * 5 * 4


def test_ape_cache_in_class_order_and_shuffled_give_the_same_logits_and_search(task):
    # K keys per class in class order: the cache is held shot-major (a faster class sum); a shuffled store keeps
    # the general per-label sum. Both must give the same logits, and each search must match the plain grid loop.
    support, text, val, _ = task
    perm = torch.randperm(len(support.labels), generator=torch.Generator().manual_seed(4))
    shuffled = SupportSet(keys=support.keys[perm], labels=support.labels[perm], views=support.views[:, perm])
    kw = dict(beta_max=6.0, alpha_max=5.0, gamma_max=2.0, beta_steps=5, alpha_steps=4, gamma_steps=3)
    ordered, mixed = _setup(APE(**kw), support, text), _setup(APE(**kw), shuffled, text)
    assert ordered.block == 8 and mixed.block == 0
    assert torch.equal(ordered.values[:C], torch.arange(C))  # shot 0 of every class first
    torch.testing.assert_close(ordered.predict(val.features), mixed.predict(val.features), rtol=1e-5, atol=1e-4)
    ordered.search_rows = 7  # blocks that do not divide the val queries
    for ape in (ordered, mixed):
        slow = _setup(APE(**kw), support if ape is ordered else shuffled, text)
        rec, rec_slow = ape.tune(val), grid_search(slow, val)
        assert ape.hparams() == slow.hparams()
        assert rec["val_acc"] == rec_slow["val_acc"] == accuracy(ape.predict(val.features), val.labels)


def test_ape_t_before_training_is_tip_adapter_on_all_channels(task):
    support, text, _, test = task
    ape_t = _setup(APET(alpha=1.7, beta=4.0, search=False), support, text)
    tip = _setup(TipAdapter(alpha=1.7, beta=4.0, search=False), support, text)
    torch.testing.assert_close(ape_t.predict(test.features), tip.predict(test.features), rtol=1e-5, atol=1e-4)
    k = round(0.78125 * D)
    assert set(ape_t.state_dict()) == {"residual", "value_scale"} and ape_t.residual.shape == (C, k)
    # the residual moves the class's text embedding and all its keys, on the selected channels only
    with torch.no_grad():
        ape_t.residual[2, 0] = 0.5
    d = int(ape_t.channels[0])
    moved_text = (ape_t.text_weights() - text).abs() > 0
    moved_keys = (ape_t.cache_keys() - support.keys).abs() > 0
    assert moved_text.nonzero().tolist() == [[2, d]]
    assert moved_keys.nonzero().tolist() == [[n, d] for n in range(len(support)) if support.labels[n] == 2]


def test_ape_t_affinities_without_building_the_keys_equal_the_keys_formula_with_gradients(task):
    support, text, _, test = task
    ape_t = _setup(APET(alpha=1.7, beta=4.0, search=False), support, text)
    with torch.no_grad():
        ape_t.residual.copy_(0.1 * torch.randn(ape_t.residual.shape, generator=torch.Generator().manual_seed(0)))
        ape_t.value_scale.mul_(torch.linspace(0.5, 1.5, len(support)))
    x = test.features
    # straightforward: every key rebuilt with its class's residual on the selected channels, all channels used
    keys = support.keys.clone()
    keys[:, ape_t.channels] += ape_t.residual[support.labels]
    tw = text.clone()
    tw[:, ape_t.channels] += ape_t.residual
    one_hot = F.one_hot(support.labels, C).float()
    expected = 100 * x @ tw.t() + 1.7 * torch.exp(-4.0 * (1 - x @ keys.t())) @ (ape_t.value_scale[:, None] * one_hot)
    logits = ape_t(x)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    y = test.labels
    got = torch.autograd.grad(F.cross_entropy(logits, y), [ape_t.residual, ape_t.value_scale])
    want = torch.autograd.grad(F.cross_entropy(expected, y), [ape_t.residual, ape_t.value_scale])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_ape_beats_zero_shot_with_a_weak_text_head(task):
    support, text, val, test = task
    ape = _setup(APE(beta_steps=20, alpha_steps=10, gamma_steps=5, alpha_max=20.0), support, text)
    ape.tune(val)
    assert accuracy(ape.predict(test.features), test.labels) > _zero_shot_accuracy(support, text, test) + 10


# ---------------------------------------------------------------------------------------------------- LP++
def test_lp_pp_initial_prototypes_multipliers_and_step_sizes(task):
    support, text, _, test = task
    lp = _setup(LPPlusPlus(), support, text)
    x = support.views.reshape(-1, D).double().numpy()
    y = support.labels.repeat(3).numpy()
    t = text.double().numpy()
    sums = np.stack([x[y == c].sum(axis=0) for c in range(C)])  # the reference's "centroids" are sums
    np.testing.assert_allclose(lp.weight.detach().numpy(), sums, rtol=1e-5, atol=1e-5)
    assert not lp.bias.detach().any()
    own = np.mean([np.mean(x[y == c] @ t[c]) for c in range(C)])
    np.testing.assert_allclose(lp.alpha.detach().numpy(), np.full(C, 250 * own), rtol=1e-5)
    assert lp.lr_w == pytest.approx(4 * len(x) / np.linalg.eigvalsh(x.T @ x).max(), rel=1e-5)
    assert lp.lr_alpha == pytest.approx(len(x) / (4 * ((x @ t.T) ** 2).sum(axis=0).max()), rel=1e-5)
    f = test.features.double().numpy()
    np.testing.assert_allclose(lp.predict(test.features).numpy(), f @ sums.T + 250 * own * (f @ t.T),
                               rtol=1e-4, atol=1e-3)
    assert set(lp.state_dict()) == {"weight", "bias", "alpha"}


def test_lp_pp_steps_match_a_hand_written_block_descent(task):
    support, text, val, _ = task
    lp = _setup(LPPlusPlus(epochs=12, alpha_every=5, select="last"), support, text)
    x, y = support.views.reshape(-1, D), support.labels.repeat(3)
    w, b = lp.weight.detach().clone(), torch.zeros(C)
    a = lp.alpha.detach().clone()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    grad_sum = torch.zeros(C)
    for step in range(1, 13):
        w.requires_grad_(True), b.requires_grad_(True), a.requires_grad_(True)
        loss = F.cross_entropy(x @ w.t() + b + a * (x @ text.t()), y)
        gw, gb, ga = torch.autograd.grad(loss, (w, b, a))
        with torch.no_grad():
            vw, vb = 0.9 * vw + gw, 0.9 * vb + gb  # SGD momentum
            w, b = w - lp.lr_w * vw, b - lp.lr_w * vb
            grad_sum = grad_sum + ga  # never reset, as the reference
            a = a - lp.lr_alpha * grad_sum if step % 5 == 0 else a.detach()
    record = lp.fit(support, val)
    assert record["selected_by"] == "last" and record["best_epoch"] == 12
    torch.testing.assert_close(lp.weight.detach(), w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp.alpha.detach(), a, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- CLAP
def test_clap_starts_at_zero_shot_with_multipliers_from_zero_shot_support_predictions(task):
    support, text, _, test = task
    clap = _setup(CLAP(), support, text)
    torch.testing.assert_close(clap.prototypes.detach(), text)
    torch.testing.assert_close(clap.predict(test.features), _setup(ZeroShot(), support, text).predict(test.features))
    x = support.views.reshape(-1, D).double().numpy()
    y = support.labels.repeat(3).numpy()
    z = 100 * x @ text.double().numpy().T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = [p[y == c, c].mean() for c in range(C)]
    np.testing.assert_allclose(clap.multipliers.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(clap.penalty().detach()) == 0.0 and set(clap.state_dict()) == {"prototypes"}


def test_clap_penalty_is_the_class_weighted_distance_and_zs_lp_has_none(task):
    support, text, _, _ = task
    clap, zs_lp = _setup(CLAP(), support, text), _setup(CLAP(constraint="none"), support, text)
    shift = torch.randn(C, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        clap.prototypes += shift
        zs_lp.prototypes += shift
    lam = clap.multipliers
    expected = sum(float(lam[c]) * float((shift[c] ** 2).sum()) for c in range(C)) / C
    assert float(clap.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    assert float(zs_lp.penalty()) == 0.0
    logits, labels = torch.randn(5, C, generator=torch.Generator().manual_seed(5)), torch.arange(5)
    ce = float(F.cross_entropy(logits, labels))
    assert float(clap.loss(logits, labels).detach()) == pytest.approx(ce + expected, rel=1e-5)
    # the augmented-Lagrangian outer update: lambda <- max(0, lambda + rho h), rho <- h
    h = (shift ** 2).sum(dim=-1)
    clap.outer_step()
    torch.testing.assert_close(clap.multipliers, lam)  # rho starts at 0
    clap.outer_step()
    torch.testing.assert_close(clap.multipliers, lam + h * h)


@pytest.mark.parametrize("adaptive", [False, True])
def test_clap_never_reads_the_validation_split(task, adaptive):
    support, text, _, test = task
    clap = _setup(CLAP(adaptive=adaptive, epochs=20, batch_size=16), support, text)
    record = clap.fit(support, _Untouchable())
    assert clap.tune(_Untouchable())["on"] == "none"
    assert record["selected_by"] == "last" and record["val_acc"] == []
    assert accuracy(clap.predict(test.features), test.labels) > _zero_shot_accuracy(support, text, test)


# ---------------------------------------------------------------------------------------------------- TaskRes
def test_taskres_zero_residual_is_zero_shot_and_the_residual_enters_scaled(task):
    support, text, _, test = task
    tr = _setup(TaskRes(residual_scale=0.5), support, text)
    torch.testing.assert_close(tr.predict(test.features), _setup(ZeroShot(), support, text).predict(test.features))
    assert set(tr.state_dict()) == {"residual", "base_norms"} and not tr.residual.detach().any()
    assert torch.equal(tr.base_norms, torch.ones(C))  # no raw norms in this context: unit norm
    x = torch.randn(C, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        tr.residual.copy_(x)
    t = text.double().numpy() + 0.5 * x.double().numpy()
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    np.testing.assert_allclose(tr.predict(test.features).numpy(), 100 * test.features.double().numpy() @ t.T,
                               rtol=1e-5, atol=1e-4)
    logits, labels = torch.randn(4, C, generator=torch.Generator().manual_seed(7)), torch.arange(4)
    expected = float(F.cross_entropy(logits, labels)) + 0.5 * 5e-4 * float((x ** 2).sum())
    assert float(tr.loss(logits, labels).detach()) == pytest.approx(expected, rel=1e-6)


def test_taskres_epochs_follow_the_shots(task):
    support, text, _, _ = task  # 8 shots
    assert _setup(TaskRes(epochs=0), support, text).spec.epochs == 200
    two = SupportSet(keys=support.keys[::4], labels=support.labels[::4])
    assert _setup(TaskRes(epochs=0), two, text).spec.epochs == 100
    assert _setup(TaskRes(epochs=7), support, text).spec.epochs == 7


# ---------------------------------------------------------------------------------------------------- KgCoOp
NAMES = ["cat", "dog", "red fox", "car", "boat", "tree"]


def _prompt_task(tiny):
    return prompt_task(tiny, NAMES)


def test_kgcoop_knowledge_term_is_zero_from_the_same_words_and_matches_a_hand_computation(tiny):
    support, _, _ = _prompt_task(tiny)
    photo = tiny.text_head(NAMES, ["a photo of a {}."])
    kg = _setup(KgCoOp(), support, photo, backbone=tiny, names=NAMES).eval()
    assert kg.context.shape[0] == 4 and kg.weight == 8.0
    assert float(kg.knowledge_term().detach()) == pytest.approx(0.0, abs=1e-5)
    # against another hand-crafted head: 8 (1 - mean_c cos), the learned prompts being "a photo of a {c}."
    sketch = tiny.text_head(NAMES, ["a sketch of a {}."])
    kg = _setup(KgCoOp(), support, sketch, backbone=tiny, names=NAMES).eval()
    w = tiny.encode_texts([f"a photo of a {n}." for n in NAMES]).double().numpy()
    t = sketch.double().numpy()
    cos = (w * t).sum(axis=1) / np.linalg.norm(w, axis=1) / np.linalg.norm(t, axis=1)
    term = float(kg.knowledge_term().detach())
    assert term == pytest.approx(8.0 * (1 - cos.mean()), rel=1e-4, abs=1e-6)
    assert term == pytest.approx(4.0 * ((w - t) ** 2).sum(axis=1).mean(), rel=1e-4, abs=1e-6)  # the paper's form / 2


def test_kgcoop_loss_adds_the_term_to_cross_entropy_with_one_text_pass(tiny, monkeypatch):
    support, _, _ = _prompt_task(tiny)
    kg = _setup(KgCoOp(), support, tiny.text_head(NAMES, ["a sketch of a {}."]), backbone=tiny, names=NAMES)
    kg.train()
    calls = []
    encode = kg.encode_text
    monkeypatch.setattr(kg, "encode_text", lambda: calls.append(1) or encode())
    logits = kg(support.keys[:5])
    loss = kg.loss(logits, support.labels[:5])
    assert len(calls) == 1  # the step's class embeddings are reused by the loss
    expected = F.cross_entropy(logits, support.labels[:5]) + kg.knowledge_term(kg.class_text_features())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert kg.context.grad is not None and kg.context.grad.abs().sum() > 0


@pytest.mark.parametrize("scale, weight_logit_scale, expected_weight", [
    (14.16, 100.0, 1.1328),  # fewclip-mini's first weights' temperature: 8.0 x 14.16 / 100
    (100.0, 100.0, 8.0),  # CLIP's: the reference's weight
    (14.16, None, 8.0),  # unscaled
])
def test_kgcoop_loss_written_out_with_the_weight_at_the_runs_logit_scale(tiny, scale, weight_logit_scale,
                                                                         expected_weight):
    support, _, _ = _prompt_task(tiny)
    sketch = tiny.text_head(NAMES, ["a sketch of a {}."])
    kg = KgCoOp(weight_logit_scale=weight_logit_scale)
    kg.setup(AdapterContext(classnames=NAMES, text_head=sketch, support=support, seed=1, progress=False,
                            backbone=tiny, logit_scale=scale))
    kg.train()
    x, y = support.keys[:5], support.labels[:5]
    loss = float(kg.loss(kg(x), y).detach())
    # Written out: at initialisation the learned prompts are the words "a photo of a {c}."; cross-entropy on
    # s x cosine, plus 8.0 x s / 100 x (1 - mean_c cos(w_c, t_c)).
    w = F.normalize(tiny.encode_texts([f"a photo of a {n}." for n in NAMES]).double(), dim=-1)
    t = F.normalize(sketch.double(), dim=-1)
    expected = F.cross_entropy(scale * x.double() @ w.T, y) + expected_weight * (1 - (w * t).sum(dim=1).mean())
    assert loss == pytest.approx(float(expected), rel=1e-4)
    assert kg.knowledge_weight == pytest.approx(expected_weight)


def test_kgcoop_refuses_a_non_positive_weight_logit_scale():
    with pytest.raises(ValueError, match="weight_logit_scale"):
        KgCoOp(weight_logit_scale=0.0)


def test_kgcoop_learns_and_stays_nearer_the_handcrafted_prompts_than_coop(tiny):
    support, val, test = _prompt_task(tiny)
    head = tiny.text_head(NAMES, ["a photo of a {}."])
    runs = {}
    for name, make in (("kgcoop", lambda: KgCoOp(epochs=20, lr=0.02, batch_size=16)),
                       ("coop", lambda: CoOp(ctx_init="a photo of a", epochs=20, lr=0.02, batch_size=16))):
        adapter = _setup(make(), support, head, backbone=tiny, names=NAMES).eval()
        before = accuracy(adapter.predict(test.features), test.labels)
        record = adapter.fit(support, val)
        runs[name] = (adapter, before, record)
    kg, before, record = runs["kgcoop"]
    assert record["train_loss"][-1] < record["train_loss"][0]
    after = accuracy(kg.predict(test.features), test.labels)
    assert after > 100 / len(NAMES) + 15 and after > before + 10
    drift = {n: float(1 - F.cosine_similarity(a.eval().class_text_features().detach(), head).mean()) for n, (a, _, _) in
             runs.items()}
    assert drift["kgcoop"] < drift["coop"]


# ---------------------------------------------------------------------------------------------------- learning
TRAINABLE = {
    "taskres": lambda: TaskRes(epochs=100, lr=0.01, batch_size=16, residual_scale=1.0),
    "clap": lambda: CLAP(epochs=100, batch_size=16),
    "zs_lp": lambda: CLAP(constraint="none", epochs=100, batch_size=16),
    "lp_pp": lambda: LPPlusPlus(epochs=100),
    "ape_t": lambda: APET(epochs=30, lr=0.01, batch_size=16, beta_steps=10, alpha_steps=10, alpha_max=20.0),
}


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_trainable_adapters_lower_their_loss_and_learn_the_task(task, name):
    support, text, val, test = task
    adapter = _setup(TRAINABLE[name](), support, text)
    record = adapter.fit(support, val)
    adapter.tune(val)
    assert record["train_loss"][-1] < record["train_loss"][0]
    acc = accuracy(adapter.predict(test.features), test.labels)
    assert acc > 100.0 / C + 40 and acc > _zero_shot_accuracy(support, text, test) + 10


# ---------------------------------------------------------------------------------------------------- cost model
@pytest.mark.parametrize("make", [
    lambda: TipAdapter(beta_steps=10, alpha_steps=4),
    lambda: APE(beta_steps=10, alpha_steps=4, gamma_steps=3),
    lambda: GDA(),
    lambda: LPPlusPlus(epochs=50),
    lambda: TaskRes(epochs=30, batch_size=16),
    lambda: CLAP(epochs=30, batch_size=16),
    lambda: APET(epochs=5, batch_size=16, beta_steps=10, alpha_steps=4),
], ids=["tip", "ape", "gda", "lp_pp", "taskres", "clap", "ape_t"])
def test_fit_cost_probes_leave_the_adapter_as_it_was(task, make):
    from adapters.linear_probe import LinearProbe

    support, text, val, test = task
    for adapter in (_setup(make(), support, text), _setup(LinearProbe(c_grid=[0.1, 1.0]), support, text)):
        before = {k: v.clone() for k, v in adapter.state_dict().items()}
        hparams, logits = adapter.hparams(), adapter.predict(test.features)
        seconds = adapter.estimate_fit_seconds(support, val)
        assert 0 < seconds < 600 and np.isfinite(seconds)
        assert adapter.hparams() == hparams
        for k, v in adapter.state_dict().items():
            assert torch.equal(v, before[k]), k
        torch.testing.assert_close(adapter.predict(test.features), logits, rtol=0, atol=0)


def test_a_training_cost_is_epochs_times_probed_steps(task, monkeypatch):
    import adapters.training as training

    support, text, val, _ = task
    monkeypatch.setattr(training, "probe_step_seconds", lambda *a, **k: 0.5)
    adapter = _setup(TaskRes(epochs=10, batch_size=16, select="last"), support, text)
    steps = -(-len(support) // 16)  # ceil: batches of 16 per epoch
    assert adapter.estimate_fit_seconds(support, val) == pytest.approx(10 * steps * 0.5)
