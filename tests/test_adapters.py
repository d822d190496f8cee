"""Zero-shot and Tip-Adapter against independent computations written here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_features

from adapters.base import AdapterContext, FeatureSplit, SupportSet, accuracy
from adapters.tip import TipAdapter, alpha_accuracies, linear_grid
from adapters.tuning import grid_search
from adapters.zero_shot import ZeroShot


def _ctx(text, keys, labels, names=None):
    names = names or [f"c{i}" for i in range(text.shape[0])]
    return AdapterContext(classnames=names, text_head=text, support=SupportSet(keys=keys, labels=labels))


def test_zero_shot_is_scaled_cosine():
    text = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    f = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    zs = ZeroShot()
    zs.setup(_ctx(text, f, torch.tensor([0, 1])))
    expected = torch.tensor([[100 * 0.0, 100 * 0.8], [100 * 1.0, 100 * 0.6]])
    torch.testing.assert_close(zs(f), expected)


def test_tip_logits_hand_computed():
    # 2 classes, 3 keys in 2-D; the cache term is written out key by key.
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = 1 / math.sqrt(2)
    keys = torch.tensor([[1.0, 0.0], [s, s], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    f = torch.tensor([[s, s], [0.6, 0.8]])
    tip = TipAdapter(alpha=2.0, beta=3.0, search=False)
    tip.setup(_ctx(text, keys, labels))
    expected = torch.zeros(2, 2)
    for q in range(2):
        for c in range(2):
            cache = sum(math.exp(-3.0 * (1 - float(f[q] @ keys[n]))) for n in range(3) if labels[n] == c)
            expected[q, c] = 100 * float(f[q] @ text[c]) + 2.0 * cache
    torch.testing.assert_close(tip(f), expected)


def test_cache_kernel_floor_leaves_no_denormal_and_changes_no_logit():
    from adapters.topk import EXP_FLOOR, affinity_kernel

    # beta = 1000, the top of the log grid: most terms exp(-1000 (1 - a)) are below float32's smallest normal.
    x, y, means = synthetic_features(7, 5, 16, noise=0.6, seed=0)
    q, _, _ = synthetic_features(7, 3, 16, noise=0.6, seed=2, means=means)
    a = q @ x.t()
    exact = torch.exp(-1000.0 * (1 - a.double()))  # float64: no floor, no denormals at these magnitudes
    assert float((exact < torch.finfo(torch.float32).tiny).double().mean()) > 0.5
    kernel = affinity_kernel(a - 1.0, 1000.0)
    assert float(kernel.min()) >= torch.finfo(torch.float32).tiny  # a normal float everywhere
    assert float((kernel.double() - exact).abs().max()) <= math.exp(EXP_FLOOR) * 1.001
    buf = torch.empty_like(a)
    assert torch.equal(affinity_kernel(a - 1.0, 1000.0, out=buf), kernel)  # the searches' in-place form
    text = F.normalize(means, dim=-1)
    tip = TipAdapter(alpha=1000.0, beta=1000.0, search=False)
    tip.setup(_ctx(text, x, y))
    expected = 100 * q.double() @ text.double().t() + 1000.0 * exact @ F.one_hot(y, 7).double()
    torch.testing.assert_close(tip(q).double(), expected, rtol=1e-6, atol=1e-4)


def test_tip_matches_dense_one_hot_formula_and_alpha_zero_is_zero_shot():
    x, y, means = synthetic_features(7, 5, 16, noise=0.6, seed=0)
    text = F.normalize(means + 0.3 * torch.randn(means.shape, generator=torch.Generator().manual_seed(1)), dim=-1)
    q, _, _ = synthetic_features(7, 3, 16, noise=0.6, seed=2, means=means)
    tip = TipAdapter(alpha=1.3, beta=5.5, search=False, chunk=4)  # small chunks exercise the blocking
    tip.setup(_ctx(text, x, y))
    dense = torch.exp(-5.5 * (1 - q @ x.t())) @ F.one_hot(y, 7).float()
    torch.testing.assert_close(tip(q), 100 * q @ text.t() + 1.3 * dense, rtol=1e-5, atol=1e-4)
    tip.alpha = 0.0
    zs = ZeroShot()
    zs.setup(_ctx(text, x, y))
    torch.testing.assert_close(tip(q), zs(q))


def test_class_sum_equals_one_hot_product():
    from adapters.tip import class_sum, label_block

    g = torch.Generator().manual_seed(0)
    v = torch.rand(5, 12, generator=g)
    blocked = torch.arange(4).repeat_interleave(3)
    assert label_block(blocked, 4) == 3 and label_block(blocked.flip(0), 4) == 0 and label_block(blocked, 5) == 0
    for labels in (blocked, torch.tensor([2, 0, 1, 3, 3, 0, 1, 2, 2, 0, 1, 3])):
        expected = v @ F.one_hot(labels, 4).float()
        torch.testing.assert_close(class_sum(v, labels, 4, label_block(labels, 4)), expected)
        torch.testing.assert_close(class_sum(v, labels, 4), expected)


def test_linear_grid_is_the_reference_grid():
    g = linear_grid(0.1, 7.0, 200)
    assert len(g) == 200 and g[0] == pytest.approx(0.1) and g[-1] < 7.0
    assert g[1] - g[0] == pytest.approx((7.0 - 0.1) / 200)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_alpha_accuracies_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(200, 30, generator=g) * 3
    cache = torch.rand(200, 30, generator=g) * 4
    if seed == 3:  # a sharp cache
        cache = cache ** 6
    labels = torch.randint(0, 30, (200,), generator=g)
    alphas = torch.tensor(linear_grid(0.1, 3.0, 20))
    slow = [accuracy(zs + a * cache, labels) for a in alphas.tolist()]
    for block in (7, 64, 512):  # blocks that do and do not divide the 200 queries
        fast = alpha_accuracies(zs, cache, labels, alphas, block=block)
        assert fast.tolist() == pytest.approx(slow, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_accuracies_equal_argmax_at_every_alpha_with_many_classes(seed):
    # many classes, near-equal logits (a flat cache, a spread text head), exact ties, non-finite rows and the
    # reference's alpha range
    g = torch.Generator().manual_seed(seed)
    n, c = 700, 400
    zs = torch.randn(n, c, generator=g) * (0.5 + seed)
    cache = torch.rand(n, c, generator=g) ** (1 + 4 * seed) * 3
    zs[:50] = zs[:50].round()  # exact ties between classes
    cache[:50] = cache[:50].round()
    cache[50:60] = float("inf")  # non-finite rows
    labels = torch.randint(0, c, (n,), generator=g)
    labels[60:160] = (zs + 2.0 * cache)[60:160].argmax(dim=1)  # many hits
    alphas = torch.tensor(linear_grid(0.1, 7.0, 20))
    expected = [float((torch.add(zs, cache, alpha=a).argmax(dim=1) == labels).double().mean() * 100)
                for a in alphas.tolist()]
    for block in (128, 512):
        assert alpha_accuracies(zs, cache, labels, alphas, block=block).tolist() == pytest.approx(expected, abs=1e-9)


def test_alpha_accuracies_break_ties_like_argmax():
    # small integers: many classes share the row maximum, before and after the label; argmax picks the lowest
    g = torch.Generator().manual_seed(0)
    zs = torch.randint(0, 3, (300, 12), generator=g).float()
    cache = torch.randint(0, 3, (300, 12), generator=g).float()
    labels = torch.randint(0, 12, (300,), generator=g)
    alphas = torch.tensor([0.0, 0.5, 1.0, 2.0])
    slow = [accuracy(torch.add(zs, cache, alpha=a), labels) for a in alphas.tolist()]
    ties = sum(int(((torch.add(zs, cache, alpha=a) == torch.add(zs, cache, alpha=a).amax(1, keepdim=True)).sum(1)
                    > 1).sum()) for a in alphas.tolist())
    assert ties > 100  # the case under test does occur
    for block in (5, 512):
        assert alpha_accuracies(zs, cache, labels, alphas, block=block).tolist() == pytest.approx(slow, abs=1e-9)


def test_tip_cache_in_class_order_and_shuffled_give_the_same_logits_and_search():
    # K keys per class in class order: training-free Tip holds them shot-major (a faster class sum); a shuffled
    # store keeps the general per-label sum; Tip-F keeps the store's order (its keys are trained state).
    from adapters.tip_f import TipAdapterF

    x, y, means = synthetic_features(7, 4, 12, noise=0.9, seed=5)
    g = torch.Generator().manual_seed(6)
    text = F.normalize(means + 1.0 * torch.randn(means.shape, generator=g), dim=-1)
    v, vy, _ = synthetic_features(7, 9, 12, noise=0.9, seed=7, means=means)
    val = FeatureSplit(features=v, labels=vy)
    perm = torch.randperm(len(y), generator=g)
    kw = dict(beta_max=9.0, alpha_max=4.0, beta_steps=12, alpha_steps=6)
    ordered, mixed, slow = TipAdapter(**kw), TipAdapter(**kw), TipAdapter(**kw)
    ordered.setup(_ctx(text, x, y))
    mixed.setup(_ctx(text, x[perm], y[perm]))
    slow.setup(_ctx(text, x, y))
    assert ordered.shot_major and not mixed.shot_major
    assert torch.equal(ordered.values[:7], torch.arange(7))  # shot 0 of every class first
    tip_f = TipAdapterF(**kw)
    tip_f.setup(_ctx(text, x, y))
    assert not tip_f.shot_major and torch.equal(tip_f.values, y)
    torch.testing.assert_close(ordered.predict(v), mixed.predict(v), rtol=1e-5, atol=1e-4)
    ordered.search_rows = 5  # blocks that do not divide the val queries
    rec, rec_slow = ordered.tune(val), grid_search(slow, val)
    assert (ordered.beta, ordered.alpha) == (slow.beta, slow.alpha)
    assert rec["val_acc"] == rec_slow["val_acc"] == accuracy(ordered.predict(v), vy)


def test_log_grid_spans_its_range_evenly_on_a_log_scale():
    # fewclip's default for Tip-Adapter, Tip-F, APE and APE-T: 0.1 ... 1000, both ends included, constant ratio.
    tip = TipAdapter(grid="log", beta_min=0.1, beta_max=1000.0, beta_steps=5, alpha_min=0.5, alpha_max=8.0,
                     alpha_steps=5)
    grid = tip.hparam_grid()
    assert grid["beta"] == pytest.approx([0.1, 1.0, 10.0, 100.0, 1000.0], rel=1e-12)
    assert grid["alpha"] == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0], rel=1e-12)
    # the reference's linear grid is the default of the class (protocol=reference sets it explicitly)
    assert TipAdapter(beta_steps=4, alpha_steps=2).hparam_grid() == {"beta": linear_grid(0.1, 7.0, 4),
                                                                      "alpha": linear_grid(0.1, 3.0, 2)}
    for bad in (dict(grid="cubic"), dict(grid="log", beta_min=0.0), dict(grid="log", alpha_min=5.0, alpha_max=1.0)):
        with pytest.raises(ValueError, match="grid"):
            TipAdapter(**bad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_tip_search_equals_the_plain_grid_loop(seed):
    x, y, means = synthetic_features(6, 4, 12, noise=0.9, seed=seed)
    g = torch.Generator().manual_seed(10 + seed)
    text = F.normalize(means + 1.0 * torch.randn(means.shape, generator=g), dim=-1)
    v, vy, _ = synthetic_features(6, 8, 12, noise=0.9, seed=20 + seed, means=means)
    val = FeatureSplit(features=v, labels=vy)
    kw = dict(beta_max=9.0, alpha_max=4.0, beta_steps=25, alpha_steps=10)
    if seed == 2:  # fewclip's log-spaced grid, reaching sharp kernels and cache-dominated logits
        kw.update(grid="log", beta_max=500.0, alpha_max=200.0)
    fast, slow = TipAdapter(**kw), TipAdapter(**kw)
    fast.setup(_ctx(text, x, y))
    slow.setup(_ctx(text, x, y))
    rec_fast = fast.tune(val)
    rec_slow = grid_search(slow, val)
    assert (fast.beta, fast.alpha) == (slow.beta, slow.alpha)
    assert rec_fast["val_acc"] == rec_slow["val_acc"] == accuracy(fast.predict(v), vy)
    # and it really is the best point of the grid (independent loop)
    best = max(
        accuracy(100 * v @ text.t() + a * (torch.exp(-b * (1 - v @ x.t())) @ F.one_hot(y, 6).float()), vy)
        for b, a in itertools.product(fast.hparam_grid()["beta"], fast.hparam_grid()["alpha"])
    )
    assert rec_fast["val_acc"] == pytest.approx(best)


def test_tip_cache_helps_on_separable_features():
    # text head is uninformative (random); the cache must carry the task
    x, y, means = synthetic_features(5, 8, 16, noise=0.3, seed=4)
    text = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    v, vy, _ = synthetic_features(5, 4, 16, noise=0.3, seed=6, means=means)
    t, ty, _ = synthetic_features(5, 20, 16, noise=0.3, seed=7, means=means)
    tip = TipAdapter(alpha_max=50.0, beta_max=10.0, beta_steps=10, alpha_steps=10)
    tip.setup(_ctx(text, x, y))
    tip.tune(FeatureSplit(v, vy))
    assert accuracy(tip.predict(t), ty) > accuracy(100 * t @ text.t(), ty) + 30


def test_state_dict_holds_no_backbone_or_cache():
    tip = TipAdapter()
    x, y, means = synthetic_features(3, 2, 8, noise=0.1, seed=0)
    tip.setup(_ctx(means, x, y))
    assert tip.state_dict() == {}
