"""Prompt learners (CoOp, CoCoOp) on the tiny backbone, against independent computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import prompt_task

from adapters.base import AdapterContext, SupportSet, accuracy
from adapters.cocoop import CoCoOp
from adapters.coop import CoOp
from adapters.zero_shot import ZeroShot

NAMES = ["cat", "dog", "red fox", "car", "boat", "tree"]


def _support(dim: int, n: int = 2) -> SupportSet:
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(len(NAMES) * n, dim, generator=g), dim=-1)
    return SupportSet(keys=keys, labels=torch.arange(len(NAMES)).repeat_interleave(n))


def _setup(adapter, tiny, support=None, head=None):
    head = head if head is not None else tiny.text_head(NAMES, ["a photo of a {}."])
    adapter.setup(AdapterContext(classnames=NAMES, text_head=head, support=support or _support(tiny.dim),
                                 backbone=tiny, progress=False))
    return adapter.eval()


def test_coop_from_words_reproduces_zero_shot(tiny):
    coop = _setup(CoOp(ctx_init="a photo of a"), tiny)
    zs = _setup(ZeroShot(), tiny)
    x = _support(tiny.dim, 5).keys
    torch.testing.assert_close(coop.predict(x), zs.predict(x), rtol=1e-5, atol=1e-4)
    assert set(coop.state_dict()) == {"context"} and coop.context.shape[0] == 4  # "a photo of a": 4 tokens


@pytest.mark.parametrize("position,text", [("front", "{} a photo of a."), ("middle", "a photo {} of a.")])
def test_class_token_positions_splice_where_the_paper_says(tiny, position, text):
    coop = _setup(CoOp(ctx_init="a photo of a", class_token_position=position), tiny)
    expected = tiny.encode_texts([text.format(n) for n in NAMES])
    torch.testing.assert_close(coop.class_text_features(), expected, rtol=1e-5, atol=1e-5)


def test_random_and_class_specific_context(tiny):
    coop = _setup(CoOp(n_ctx=16), tiny)
    assert coop.context.shape == (16, 64) and 0.01 < float(coop.context.detach().std()) < 0.03
    csc = _setup(CoOp(n_ctx=3, csc=True), tiny)
    assert csc.context.shape == (len(NAMES), 3, 64)
    assert csc.predict(_support(tiny.dim).keys).shape == (12, len(NAMES))


def test_coop_epochs_follow_the_shots(tiny):
    # KaiyangZhou/CoOp COOP.md: rn50_ep50 for 1 shot, rn50_ep100 for 2 and 4, rn50 (200) for 8 and 16
    assert _setup(CoOp(epochs=0), tiny, _support(tiny.dim, 1)).spec.epochs == 50
    assert _setup(CoOp(epochs=0), tiny, _support(tiny.dim, 2)).spec.epochs == 100
    assert _setup(CoOp(epochs=0), tiny, _support(tiny.dim, 8)).spec.epochs == 200
    assert _setup(CoOp(epochs=0), tiny, _support(tiny.dim, 16)).spec.epochs == 200
    assert _setup(CoOp(epochs=7), tiny, _support(tiny.dim, 16)).spec.epochs == 7


def test_cocoop_with_a_silent_meta_net_is_coop(tiny):
    cocoop = _setup(CoCoOp(ctx_init="a photo of a"), tiny)
    with torch.no_grad():
        cocoop.meta_net[2].weight.zero_()
        cocoop.meta_net[2].bias.zero_()
    zs = _setup(ZeroShot(), tiny)
    x = _support(tiny.dim, 2).keys
    torch.testing.assert_close(cocoop.predict(x), zs.predict(x), rtol=1e-5, atol=1e-4)
    assert {k.split(".")[0] for k in cocoop.state_dict()} == {"context", "meta_net"}


@pytest.mark.parametrize("make", [
    lambda: CoOp(epochs=20, lr=0.02, batch_size=16),
    lambda: CoCoOp(epochs=3, lr=0.02, batch_size=4),
], ids=["coop", "cocoop"])
def test_prompt_learners_learn_a_synthetic_task(tiny, make):
    # Image features sit near the embeddings of another template: the learned context must move toward it.
    support, val, test = prompt_task(tiny, NAMES)
    adapter = _setup(make(), tiny, support)
    before = accuracy(adapter.predict(test.features), test.labels)
    record = adapter.fit(support, val)
    after = accuracy(adapter.predict(test.features), test.labels)
    assert record["train_loss"][-1] < 0.7 * record["train_loss"][0]
    assert after > 100 / len(NAMES) + 15 and after > before + 10


def _with_and_without_shared_prefix(make, tiny):
    shared, full = _setup(make(share_prefix=True), tiny), _setup(make(share_prefix=False), tiny)
    full.load_state_dict(shared.state_dict())
    return shared.train(), full.train()


@pytest.mark.parametrize("make", [
    lambda **kw: CoOp(n_ctx=16, **kw),
    lambda **kw: CoOp(n_ctx=2, ctx_init="a photo of a", **kw),  # "of a" stays fixed: part of the shared prefix
], ids=["random-16", "words-2-of-4"])
def test_shared_prefix_equals_the_full_prompts_with_gradients(tiny, make):
    shared, full = _with_and_without_shared_prefix(make, tiny)
    assert shared.prefix_len == 1 + shared.n_ctx + (2 if shared.ctx_init else 0) and full.prefix_len == 0
    x = _support(tiny.dim, 3).keys
    y = torch.arange(len(NAMES)).repeat_interleave(3)
    grads = []
    for a in (shared, full):
        loss = F.cross_entropy(a(x), y)
        grads.append(torch.autograd.grad(loss, a.context)[0])
        torch.testing.assert_close(a.encode_text(), full.encode_text(), rtol=1e-5, atol=1e-6)
    scale = float(grads[1].abs().max())
    assert scale > 0 and float((grads[0] - grads[1]).abs().max()) <= 1e-4 * scale  # float rounding only


def test_cocoop_shared_prefix_batches_images_and_matches_per_image_prompts(tiny):
    shared, full = _with_and_without_shared_prefix(lambda **kw: CoCoOp(chunk=3, **kw), tiny)
    x = _support(tiny.dim, 2).keys  # 12 images: chunks of 3
    y = torch.arange(len(NAMES)).repeat_interleave(2)
    # independent computation: one image at a time, its prompts spliced by hand and run through the full encoder
    rows = []
    for f in x:
        ctx_i = full.context + full.meta_net(f[None])[0]
        prompts = torch.cat([full.token_sos, ctx_i[None].expand(len(NAMES), -1, -1), full.token_suffix], dim=1)
        rows.append(100 * f @ tiny.encode_prompt_embeddings(prompts, full.meta_tokens).t())
    expected = torch.stack(rows)
    params = lambda a: [a.context, *a.meta_net.parameters()]  # noqa: E731
    exp_grads = torch.autograd.grad(F.cross_entropy(expected, y), params(full))
    for a in (shared, full):
        logits = a(x)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
        for g, e in zip(torch.autograd.grad(F.cross_entropy(logits, y), params(a)), exp_grads):
            assert float((g - e).abs().max()) <= 1e-4 * float(e.abs().max())  # float rounding only


def test_feature_batch_size_scales_the_learning_rates_linearly(tiny):
    support, val, _ = prompt_task(tiny, NAMES)
    coop = _setup(CoOp(epochs=3, batch_size=8, lr=0.002, warmup_epochs=1, warmup_lr=1e-5, feature_batch_size=32),
                  tiny, support)
    spec = coop.effective_spec()
    assert (spec.batch_size, spec.lr, spec.warmup_lr, spec.epochs, spec.warmup_epochs) == (32, 0.008, 4e-5, 3, 1)
    assert coop.spec.batch_size == 8 and coop.spec.lr == 0.002  # the paper's recipe is kept as given
    record = coop.fit(support, val)
    assert record["batch_rule"]["paper_batch_size"] == 8
    assert record["optimisation"]["iterations"] == 3 * -(-len(support) // 32)
    assert _setup(CoOp(batch_size=32, feature_batch_size=16), tiny).effective_spec().batch_size == 32  # never smaller
    # A support set smaller than the batch: a step sees every image, and k counts those (len(support) / 8).
    n = len(support)
    small = _setup(CoOp(epochs=3, batch_size=8, lr=0.002, feature_batch_size=4 * n), tiny, support)
    assert (small.effective_spec().batch_size, small.effective_spec().lr) == (n, pytest.approx(0.002 * n / 8))
    # the square-root rule: a batch 4x the paper's trains at 2x its learning rates
    sqrt = _setup(CoOp(epochs=3, batch_size=8, lr=0.002, warmup_lr=1e-5, feature_batch_size=32,
                       feature_lr_rule="sqrt"), tiny, support).effective_spec()
    assert (sqrt.batch_size, sqrt.lr, sqrt.warmup_lr) == (32, pytest.approx(0.004), pytest.approx(2e-5))
    with pytest.raises(ValueError, match="feature_lr_rule"):
        CoOp(feature_lr_rule="cubic")


def test_prompt_learner_cost_probe_leaves_the_context_unchanged(tiny):
    support, val, test = prompt_task(tiny, NAMES)
    for adapter in (_setup(CoOp(epochs=4, batch_size=16), tiny, support),
                    _setup(CoCoOp(epochs=2, batch_size=4), tiny, support)):
        before = {k: v.clone() for k, v in adapter.state_dict().items()}
        logits = adapter.predict(test.features)
        assert adapter.estimate_fit_seconds(support, val) > 0
        for k, v in adapter.state_dict().items():
            assert torch.equal(v, before[k]), k
        torch.testing.assert_close(adapter.predict(test.features), logits, rtol=0, atol=0)
