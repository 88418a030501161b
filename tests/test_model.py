"""The model: sparse loss equals the full-logits reference, encoders read the right layer, connectors obey the
registry contract, and a wrong image-token count is a loud error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_VISION, tiny_model_config
from mmalign.constants import IGNORE_INDEX
from mmalign.models.builder import build_model
from mmalign.models.multimodal import MediaCountError
from mmalign.registry import CONNECTORS, ENCODERS


@pytest.fixture()
def model(shapes):
    model, _ = build_model(tiny_model_config(shapes["tokenizer"]))
    return model


def batch_for(model, batch=2, text=6):
    n = model.encoders["image"].num_tokens
    ids = torch.cat([torch.randint(10, 30, (batch, 2)), torch.full((batch, n), model.media_token_ids["image"]),
                     torch.randint(10, 30, (batch, text))], dim=1)  # fmt: skip
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -3:] = ids[:, -3:]
    mask = torch.ones_like(ids)
    mask[0, -1], labels[0, -1] = 0, IGNORE_INDEX  # one padded position
    pixels = torch.randn(batch, 3, model.encoders["image"].image_size, model.encoders["image"].image_size)
    return dict(input_ids=ids, attention_mask=mask, media={"image": pixels}, labels=labels)


def test_sparse_loss_equals_full_logits_cross_entropy(model):
    b = batch_for(model)
    model.requires_grad_(True)
    out = model(**b)
    loss = out["loss_sum"] / out["n_tokens"]
    grads = torch.autograd.grad(loss, [model.connectors["image"].linears[0].weight, model.lm_head.weight])
    logits = model(**{k: v for k, v in b.items() if k != "labels"})["logits"]
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1))
    ref_grads = torch.autograd.grad(ref, [model.connectors["image"].linears[0].weight, model.lm_head.weight])
    assert out["n_tokens"] == int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) == 5
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_image_features_land_in_image_positions(model):
    b = batch_for(model)
    embeds = model.embed(b["input_ids"], b["media"])
    feats = model.encode("image", b["media"]["image"])
    is_image = b["input_ids"] == model.media_token_ids["image"]
    torch.testing.assert_close(embeds[is_image], feats.reshape(-1, feats.shape[-1]))
    text = model.llm.get_input_embeddings()(b["input_ids"])
    torch.testing.assert_close(embeds[~is_image], text[~is_image])


def test_image_count_mismatch_names_the_samples(model):
    b = batch_for(model)
    with pytest.raises(MediaCountError, match=r"s1: \d+ image tokens, s2"):
        model(b["input_ids"], media={"image": b["media"]["image"][:1]}, sample_ids=["s1", "s2"])
    n = model.encoders["image"].num_tokens
    extra = torch.cat([b["media"]["image"], b["media"]["image"][:1]])  # more images than image positions
    with pytest.raises(MediaCountError, match=rf"{2 * n} image-token positions but 3 image items x {n} tokens"):
        model(b["input_ids"], media={"image": extra})
    with pytest.raises(MediaCountError, match=r"no encoder for \['audio'\]; it reads \['image'\]"):
        model(b["input_ids"], media={"image": b["media"]["image"], "audio": torch.zeros(2, 8)})


def test_frozen_encoder_runs_without_autograd(model):
    seen = []
    model.encoders["image"].register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    pixels = torch.randn(1, 3, 32, 32)
    model.encoders["image"].requires_grad_(False)
    model.encode("image", pixels)
    model.encoders["image"].requires_grad_(True)
    model.encode("image", pixels)
    assert seen == [False, True]  # no_grad follows the freeze, decided outside forward


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("layer", [-1, -2, 1])
@pytest.mark.parametrize("keep_cls", [False, True])
def test_encoder_reads_the_selected_hidden_layer(family, layer, keep_cls):
    if family == "siglip" and keep_cls:
        with pytest.raises(ValueError, match="no CLS"):
            ENCODERS.build(family, config=dict(TINY_VISION), feature_layer=layer, keep_cls=True)
        return
    enc = ENCODERS.build(family, config=dict(TINY_VISION), feature_layer=layer, keep_cls=keep_cls).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = enc.tower(x, output_hidden_states=True).hidden_states[layer]
        got = enc(x)
    if family == "clip" and not keep_cls:
        ref = ref[:, 1:]
    assert got.shape == (2, enc.num_tokens, 32)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_connector_contract(name):
    conn = CONNECTORS.build(name, in_dim=8, out_dim=12)
    x = torch.randn(2, 5, 8)
    y = conn(x)
    assert y.shape == (2, 5, 12)
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in conn.parameters())
    clone = CONNECTORS.build(name, in_dim=8, out_dim=12)
    clone.load_state_dict(conn.state_dict())
    torch.testing.assert_close(clone(x), y)
    assert len(conn.linears) == {"linear": 1, "mlp2x_gelu": 2, "mlp3x_gelu": 3}[name]


def test_unknown_connector_lists_the_known_ones():
    with pytest.raises(KeyError, match="linear"):
        CONNECTORS.build("qformer", in_dim=8, out_dim=8)


def test_head_loss_never_runs_a_plain_head_and_runs_any_other_through_its_forward(model):
    """A plain linear head (its bias included) goes through the chunked loss, so its (N, V) logits never exist; a
    head of another type (wrapped by PEFT, quantised) through its own forward."""
    torch.manual_seed(0)
    dim, vocab = model.lm_head.in_features, model.lm_head.out_features
    hidden, targets = torch.randn(5, dim), torch.randint(0, vocab, (5,))
    calls = []

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            calls.append(x.shape)
            return 2 * super().forward(x)

    plain = torch.nn.Linear(dim, vocab)
    torch.nn.init.normal_(plain.bias, std=3.0)
    plain.register_forward_hook(lambda *args: calls.append("plain"))
    model.llm.set_output_embeddings(plain)
    expected = F.cross_entropy(F.linear(hidden, plain.weight, plain.bias), targets, reduction="sum")
    torch.testing.assert_close(model.head_loss(hidden, targets), expected)
    assert calls == []
    doubled = Doubled(dim, vocab)
    model.llm.set_output_embeddings(doubled)
    expected = F.cross_entropy(2 * F.linear(hidden, doubled.weight, doubled.bias), targets, reduction="sum")
    torch.testing.assert_close(model.head_loss(hidden, targets), expected)
    assert calls == [hidden.shape]


def test_encoders_connectors_and_placeholders_must_name_the_same_modalities(model):
    from mmalign.models.multimodal import MultimodalLM

    parts = dict(encoders={"image": model.encoders["image"]}, connectors={"image": model.connectors["image"]})
    with pytest.raises(ValueError) as err:
        MultimodalLM(**parts, llm=model.llm, media_token_ids={"audio": 5})
    assert str(err.value) == (
        "encoders ['image'], connectors ['image'] and placeholder ids ['audio'] must name the same modalities"
    )
    with pytest.raises(ValueError, match=r"^encoders \['image'\], connectors \[\] and placeholder ids \['image'\]"):
        MultimodalLM(encoders=parts["encoders"], connectors={}, llm=model.llm, media_token_ids={"image": 5})
