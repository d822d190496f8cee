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
