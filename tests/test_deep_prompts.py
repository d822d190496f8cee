"""Deep prompts (MaPLe, DPT) on the tiny backbone, against forward passes written out here block by block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapters.base import AdapterContext, SupportSet
from adapters.dpt import DPT
from adapters.maple import MaPLe
from caches.backbone import FrozenClip, UnsupportedBackboneError

NAMES = ["cat", "dog", "red fox", "car", "boat"]


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _setup(adapter, backbone, head=None):
    head = head if head is not None else backbone.text_head(NAMES, ["a photo of a {}."])
    support = SupportSet(keys=F.normalize(torch.randn(len(NAMES), backbone.dim), dim=-1),
                         labels=torch.arange(len(NAMES)))
    adapter.setup(AdapterContext(classnames=NAMES, text_head=head, support=support, backbone=backbone,
                                 progress=False))
    return adapter.eval()


def _text_by_hand(bb: FrozenClip, embeds, tokens, deep, start=1):
    """The text tower on the full 77-token sequence, context positions overwritten before blocks 1..J-1."""
    m = bb.model
    x = embeds + m.positional_embedding
    for j, block in enumerate(m.transformer.resblocks):
        if 1 <= j <= len(deep):
            x = x.clone()
            x[:, start : start + deep[j - 1].shape[0]] = deep[j - 1]
        x = block(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(-1)] @ m.text_projection
    return F.normalize(x, dim=-1)


def _vision_by_hand(bb: FrozenClip, pixels, first, deep):
    """The ViT with M prompt tokens appended before ln_pre, replaced before blocks 1..J-1, dropped at the end."""
    v = bb.model.visual
    x = v.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], dim=1) + v.positional_embedding
    n = x.shape[1]
    x = v.ln_pre(torch.cat([x, first.expand(len(x), -1, -1)], dim=1))
    for j, block in enumerate(v.transformer.resblocks):
        if 1 <= j <= len(deep):
            x = torch.cat([x[:, :n], deep[j - 1].expand(len(x), -1, -1)], dim=1)
        x = block(x)
    return F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)


def test_prompted_paths_without_prompts_are_the_plain_encoders(tiny):
    px = _pixels(4)
    torch.testing.assert_close(tiny.encode_images_prompted(px, lambda i, t: None), tiny.encode_images(px))
    tokens, embeds = tiny.token_embeddings([f"a photo of a {n}." for n in NAMES])
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_prompt_embeddings(embeds, tokens), tiny.encode_texts(
            [f"a photo of a {n}." for n in NAMES]), rtol=1e-5, atol=1e-5)


def test_deep_text_prompts_replace_the_context_before_each_block(tiny):
    tokens, embeds = tiny.token_embeddings([f"a photo of a {n}." for n in NAMES])
    deep = [torch.randn(2, 64, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        got = tiny.encode_prompt_embeddings(embeds, tokens, deep_prompts=deep)
        expected = _text_by_hand(tiny, embeds, tokens, deep)
        plain = tiny.encode_prompt_embeddings(embeds, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the prompts do something


def test_maple_forward_equals_the_forward_written_out(tiny):
    maple = _setup(MaPLe(depth=2), tiny)
    with torch.no_grad():
        for p in (maple.context, maple.deep_text):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    px = _pixels(3, seed=1)
    with torch.no_grad():
        # text: "a photo of a {}." with "a photo" replaced by the learned context, deep prompt before block 1
        tokens, embeds = tiny.token_embeddings([f"a photo of a {n}." for n in NAMES])
        embeds = embeds.clone()
        embeds[:, 1:3] = maple.context
        text = _text_by_hand(tiny, embeds, tokens, [maple.deep_text[0]])
        image = _vision_by_hand(tiny, px, maple.proj(maple.context), [maple.deep_proj[0](maple.deep_text[0])])
    torch.testing.assert_close(maple.predict(px), 100 * image @ text.t(), rtol=1e-4, atol=1e-3)
    # the reference starts every deep coupling function from one initialisation
    assert maple.deep_proj is not None and len(maple.deep_proj) == 1
    assert {k.split(".")[0] for k in maple.state_dict()} == {"context", "deep_text", "proj", "deep_proj"}


@pytest.mark.parametrize("make", [lambda: MaPLe(depth=0), lambda: DPT(ctx_init="a photo of a", vpt_tokens=0,
                                                                       cavpt_layers=0)], ids=["maple", "dpt"])
def test_without_visual_or_deep_prompts_they_reduce_to_zero_shot(tiny, make):
    adapter = _setup(make(), tiny)
    px = _pixels(6, seed=2)
    with torch.no_grad():
        expected = 100 * tiny.encode_images(px) @ tiny.encode_texts([f"a photo of a {n}." for n in NAMES]).t()
    torch.testing.assert_close(adapter.predict(px), expected, rtol=1e-4, atol=1e-3)


def test_dpt_prompts_and_auxiliary_loss(tiny):
    dpt = _setup(DPT(vpt_tokens=3, cavpt_layers=1, class_prompts=2, pretrain_epochs=0, alpha=0.5), tiny)
    assert dpt.vpt.shape == (1, 3, 64) and len(dpt.cavpt) == 1 and dpt.k == 2
    px, labels = _pixels(4, seed=4), torch.tensor([0, 1, 2, 3])
    dpt.train()
    logits = dpt(px)
    aux = dict(dpt._aux)
    loss = dpt.loss(logits, labels)
    # by hand: cross-entropy, plus alpha x cross-entropy of the CAVPT classifier on the chosen true classes
    chosen = (tiny.encode_images(px) @ dpt.text_head.t()).topk(2, dim=-1).indices
    assert torch.equal(aux["chosen"], chosen)
    rows = [(b, k) for b in range(4) for k in range(2) if chosen[b, k] == labels[b]]
    expected = F.cross_entropy(logits, labels)
    if rows:
        layer = aux["layers"][:, 0]  # [B, K, C], one CAVPT block
        expected = expected + 0.5 * F.cross_entropy(torch.stack([layer[b, k] for b, k in rows]),
                                                     torch.stack([labels[b] for b, _ in rows]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert dpt.vpt.grad is not None and dpt.context.grad is not None
    assert dpt.cavpt[0].meta_net.weight.grad is not None
    groups = dpt.param_groups()
    assert groups[0]["params"] == [dpt.context] and groups[0]["lr"] == 0.002 and groups[0]["warmup_epochs"] == 1


def test_dpt_guidance_epochs_use_the_frozen_branches(tiny):
    dpt = _setup(DPT(vpt_tokens=2, cavpt_layers=0, pretrain_epochs=2), tiny)
    px, labels = _pixels(3, seed=6), torch.tensor([0, 4, 2])
    dpt.train()
    dpt.start_epoch(1)
    logits = dpt(px)
    aux = dict(dpt._aux)
    text = dpt.class_text_features()
    with torch.no_grad():
        zs_image = tiny.encode_images(px)
    torch.testing.assert_close(aux["zs_image_logits"], 100 * zs_image @ text.t())
    expected = (F.cross_entropy(100 * zs_image @ text.t(), labels) + F.cross_entropy(aux["zs_text_logits"], labels)
                + 0.1 * F.cross_entropy(logits, labels))
    torch.testing.assert_close(dpt.loss(logits, labels), expected)


@pytest.mark.parametrize("make", [MaPLe, DPT], ids=["maple", "dpt"])
def test_visual_prompts_refuse_a_resnet_backbone(make):
    rn = FrozenClip("fewclip-tiny-rn", None, device="cpu")
    with pytest.raises(UnsupportedBackboneError, match="ViT"):
        _setup(make(), rn)


def test_maple_depth_beyond_the_backbone_is_lowered_to_its_layers(tiny, caplog):
    maple = _setup(MaPLe(depth=9), tiny)  # the tiny model has 2 layers per tower
    assert maple.depth == 2 and len(maple.deep_proj) == 1 and "exceeds" in caplog.text


@pytest.mark.parametrize("adapter,extra", [
    ("maple", ["adapter.lr=0.05"]),
    ("dpt", ["adapter.pretrain_epochs=3", "adapter.warmup_epochs=1", "adapter.lr=0.05"]),
])
def test_deep_prompt_learners_learn_a_synthetic_image_task(tmp_path, adapter, extra):
    """Class-coloured images, a random tiny backbone (zero-shot at chance): the prompts must learn the classes."""
    from conftest import make_class_folder

    from fewclip.config import compose
    from fewclip.runner import run

    root = make_class_folder(tmp_path / "imgs", {f"class{i}": 24 for i in range(4)})
    res = run(compose([f"cache_dir={tmp_path / 'cache'}", "progress=false", "device=cpu", "dataset=folder",
                       f"dataset.root={root}", f"adapter={adapter}", "shots=8", "views=2", "adapter.epochs=10",
                       "adapter.batch_size=8", *extra]), out_dir=tmp_path / "out")
    losses = res["selection"]["fit"]["train_loss"]
    assert res["selection"]["fit"]["mode"].startswith("pixels") and len(losses) == 10
    assert losses[-1] < 0.5 * losses[0]
    assert res["test_acc"] > 25 + 20  # chance is 25%
