"""Each fusion module against its formula written out by hand, and the architecture its docstring promises."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from mmalign.fusion.modules import build_fusion

NAMES = ["attention", "bilinear", "concat", "gated", "product", "tensor"]
DIMS = {"audio": 8, "image": 12}  # "audio" sorts first: modality index 0, token 1 of the attention fusion


def features(batch=5, seed=0, dims=DIMS):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g) for m, d in dims.items()}


def perturb(module, seed=1):
    """Move every parameter off its init (zero biases, unit norms) so a dropped bias or scale shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def test_a_fusion_needs_a_modality():
    with pytest.raises(ValueError, match="^a fusion module needs at least one modality$"):
        build_fusion("concat", {}, 16)


@pytest.mark.parametrize("name", NAMES)
def test_one_modality_and_the_declared_width(name):
    fusion = build_fusion(name, {"image": 12}, 16)
    assert fusion.dim == 16
    assert fusion(features(dims={"image": 12})).shape == (5, 16)


@pytest.mark.parametrize("name", NAMES)
def test_the_output_stays_on_the_features_device(name):
    # The meta device stands in for a GPU: a presence mask made on the CPU would not mix with it.
    fusion = build_fusion(name, DIMS, 16).to("meta")
    x = {m: t.to("meta") for m, t in features().items()}
    assert fusion({"image": x["image"]}).device.type == "meta"
    assert fusion(x, {"audio": torch.tensor([True, False, True, True, False])}).device.type == "meta"


@pytest.mark.parametrize("name", NAMES)
def test_a_bfloat16_module_gives_bfloat16(name):
    fusion = build_fusion(name, DIMS, 16).to(torch.bfloat16)
    x = {m: t.to(torch.bfloat16) for m, t in features().items()}
    assert fusion(x, {"audio": torch.tensor([True, False, True, True, False])}).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["attention", "bilinear", "concat", "product", "tensor"])
def test_the_output_is_layer_normed(name):
    out = build_fusion(name, DIMS, 16)(features())
    assert torch.allclose(out.mean(-1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(5), atol=1e-3)


def test_concat_projects_the_features_and_presence_flags():
    fusion = perturb(build_fusion("concat", DIMS, 16))
    x, mask = features(), {"audio": torch.tensor([True, False, True, True, False])}
    audio = x["audio"] * mask["audio"][:, None]
    flags = torch.stack([mask["audio"].float(), torch.ones(5)], 1)
    linear, norm = fusion.proj
    want = norm(linear(torch.cat([audio, x["image"], flags], 1)))
    assert torch.allclose(fusion(x, mask), want, atol=1e-5)


def test_gated_fusion_is_the_gmu_for_two_modalities():
    fusion = perturb(build_fusion("gated", DIMS, 16))
    x = features()
    h = {m: torch.tanh(fusion.proj[m](x[m])) for m in DIMS}
    logits = fusion.gate(torch.cat([x["audio"], x["image"], torch.ones(5, 2)], 1)).view(5, 2, 16)
    z = torch.sigmoid(logits[:, 0] - logits[:, 1])  # the GMU's gate: z h_a + (1 - z) h_b
    assert torch.allclose(fusion(x), z * h["audio"] + (1 - z) * h["image"], atol=1e-5)
    # Only the present modality speaks; a sample with none gives zeros rather than NaN or a bias.
    assert torch.allclose(fusion({"image": x["image"]}), h["image"], atol=1e-5)
    nothing = {m: torch.zeros(5, dtype=torch.bool) for m in DIMS}
    assert torch.equal(fusion(x, nothing), torch.zeros(5, 16))


def test_product_fusion_multiplies_one_plus_each_projection():
    fusion = perturb(build_fusion("product", DIMS, 16))
    x = features()
    a, b = (1 + fusion.proj[m](x[m]) for m in DIMS)
    assert torch.allclose(fusion(x), fusion.norm(a * b), atol=1e-5)
    assert torch.allclose(fusion({"audio": x["audio"]}), fusion.norm(a), atol=1e-5)  # a missing factor is 1


def test_low_rank_bilinear_equals_the_full_tensor_contraction():
    fusion = perturb(build_fusion("bilinear", DIMS, 16))
    x = features()
    za, zb = (torch.cat([x[m], torch.ones(5, 1)], 1) for m in DIMS)
    fa, fb = fusion.factors["audio"], fusion.factors["image"]
    weight = torch.einsum("r,rio,rjo->ijo", fusion.mix[0], fa, fb)  # the (9, 13, 16) tensor the factors stand for
    want = fusion.norm(torch.einsum("bi,bj,ijo->bo", za, zb, weight) + fusion.bias)
    assert torch.allclose(fusion(x), want, atol=1e-4)


def test_low_rank_bilinear_init_and_rank():
    torch.manual_seed(0)
    fusion = build_fusion("bilinear", {"audio": 3, "image": 8}, 256)
    assert fusion.rank == 8 and fusion.factors["audio"].shape == (8, 4, 256)
    assert fusion.factors["audio"].std().item() == pytest.approx(4**-0.5, rel=0.03)  # unit-variance outputs
    assert fusion.factors["image"].std().item() == pytest.approx(9**-0.5, rel=0.03)
    assert torch.equal(fusion.mix, torch.full((1, 8), 1 / 8))
    assert build_fusion("bilinear", DIMS, 16, rank=3).factors["image"].shape == (3, 13, 16)


def test_tensor_fusion_is_the_flattened_outer_product():
    fusion = perturb(build_fusion("tensor", DIMS, 16))
    x = features()
    za, zb = (torch.cat([fusion.proj[m](x[m]), torch.ones(5, 1)], 1) for m in DIMS)
    assert fusion.proj["audio"].out_features == 8  # the default rank
    outer = torch.einsum("bi,bj->bij", za, zb).flatten(1)
    assert torch.allclose(fusion(x), fusion.out(outer), atol=1e-5)
    zb_missing = torch.cat([torch.zeros(5, 8), torch.ones(5, 1)], 1)  # a missing modality is [0; 1]
    missing = torch.einsum("bi,bj->bij", za, zb_missing).flatten(1)
    assert torch.allclose(fusion({"audio": x["audio"]}), fusion.out(missing), atol=1e-5)


def test_attention_fusion_architecture():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "enable_nested_tensor is True, but ..." on every build
        fusion = build_fusion("attention", {"audio": 8, "image": 12, "imu": 5}, 64)
    layers = fusion.blocks.layers
    assert len(layers) == 2
    assert all(layer.norm_first and layer.linear1.out_features == 128 and layer.dropout.p == 0 for layer in layers)
    assert fusion.kind.shape == (3, 64) and fusion.summary.shape == (1, 1, 64)
    for p in (fusion.kind, fusion.summary):
        assert 0.01 < p.std().item() < 0.04  # small: the tokens start as their projections


def test_attention_fusion_reads_the_summary_token_over_present_modalities():
    fusion = perturb(build_fusion("attention", DIMS, 16)).train()
    x, mask = features(), {"audio": torch.tensor([True, False, True, True, False])}
    out = fusion(x, mask)
    assert torch.equal(out, fusion(x, mask)), "training mode is not deterministic: dropout is on"
    audio = x["audio"] * mask["audio"][:, None]
    tokens = torch.stack([fusion.proj["audio"](audio), fusion.proj["image"](x["image"])], 1)
    tokens = torch.cat([fusion.summary.expand(5, 1, 16), tokens + fusion.kind], 1)
    ignore = torch.stack([torch.zeros(5, dtype=torch.bool), ~mask["audio"], torch.zeros(5, dtype=torch.bool)], 1)
    h = tokens
    for layer in fusion.blocks.layers:  # pre-norm blocks written out
        a = layer.norm1(h)
        h = h + layer.self_attn(a, a, a, key_padding_mask=ignore, need_weights=False)[0]
        h = h + layer.linear2(F.relu(layer.linear1(layer.norm2(h))))
    assert torch.allclose(out, fusion.norm(h[:, 0]), atol=1e-5)
    # An absent modality is out of the keys: its projection cannot reach the samples that lack it.
    with torch.no_grad():
        fusion.proj["audio"].bias.add_(3 * torch.randn(16))  # not a constant: pre-norm removes those
    moved = fusion(x, mask)
    assert torch.allclose(moved[~mask["audio"]], out[~mask["audio"]], atol=1e-5)
    assert not torch.allclose(moved[mask["audio"]], out[mask["audio"]], atol=1e-3)
