import pytest
import torch

from mmalign.config import EncoderConfig
from mmalign.fusion.classifier import MultimodalClassifier, modality_dropout
from mmalign.fusion.config import ClassifierModelConfig, FusionConfig, TaskConfig
from mmalign.fusion.modules import FUSIONS, build_fusion
from mmalign.fusion.tasks import TaskSpec

NAMES = ["attention", "bilinear", "concat", "gated", "product", "tensor"]
DIMS = {"image": 12, "audio": 8, "imu": 5}


def features(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g, requires_grad=True) for m, d in DIMS.items()}


def test_every_fusion_is_registered():
    assert set(NAMES) <= set(FUSIONS.names())
    with pytest.raises(KeyError, match="unknown fusion 'nope'.*concat"):
        build_fusion("nope", DIMS, 16)


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_gradients_reach_every_input_and_parameter(name):
    torch.manual_seed(0)
    fusion = build_fusion(name, DIMS, 16)
    x = features()
    out = fusion(x)
    assert out.shape == (6, 16)
    out.pow(2).sum().backward()
    for m, t in x.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, f"{name}: no gradient reaches {m}"
    dead = [n for n, p in fusion.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"{name}: parameters without gradient {dead}"


@pytest.mark.parametrize("name", NAMES)
def test_output_ignores_dict_order_and_masked_modalities(name):
    torch.manual_seed(0)
    fusion = build_fusion(name, DIMS, 16).eval()
    x = features()
    reordered = {m: x[m] for m in reversed(list(x))}
    assert torch.allclose(fusion(x), fusion(reordered), atol=1e-6)
    mask = {"audio": torch.tensor([True, False, True, False, True, False])}
    out = fusion(x, mask)
    noisy = dict(x, audio=x["audio"] + 100 * torch.randn_like(x["audio"]))
    out_noisy = fusion(noisy, mask)
    assert torch.allclose(out[1::2], out_noisy[1::2], atol=1e-5), "a masked modality still changes the output"
    assert not torch.allclose(out[0::2], out_noisy[0::2], atol=1e-3), "a present modality is ignored"
    absent = {m: t for m, t in x.items() if m != "audio"}
    all_masked = {"audio": torch.zeros(6, dtype=torch.bool)}
    assert torch.allclose(fusion(absent), fusion(x, all_masked), atol=1e-6)


def test_fusion_rejects_unknown_modality_and_wrong_width():
    fusion = build_fusion("concat", DIMS, 16)
    with pytest.raises(KeyError, match="depth"):
        fusion({"depth": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="audio features have shape"):
        fusion({"image": torch.zeros(2, 12), "audio": torch.zeros(2, 9)})


def test_modality_dropout_never_hides_everything():
    g = torch.Generator().manual_seed(0)
    present = {"image": torch.ones(4000, dtype=torch.bool), "audio": torch.ones(4000, dtype=torch.bool)}
    kept = modality_dropout(present, 0.5, g)
    both = torch.stack([kept["image"], kept["audio"]], 1)
    assert both.any(1).all()
    # each is hidden with p=0.5 except that "both hidden" (p=0.25) is restored: 1/3 of the hides are undone
    assert abs((~kept["image"]).float().mean().item() - 0.25) < 0.03
    assert modality_dropout(present, 0.0, g) is present


def tiny_model(sharing="hard", levels=None, depth=2):
    enc = EncoderConfig(name="modality-transformer", config={"dim": 16, "depth": 1, "heads": 2})
    tasks = {t: TaskConfig(level=level) for t, level in (levels or {}).items()}
    cfg = ClassifierModelConfig(encoders={"imu": enc, "signal": enc}, fusion=FusionConfig("concat", 16),
                                trunk_depth=depth, tasks=tasks, sharing=sharing)  # fmt: skip
    torch.manual_seed(0)
    return MultimodalClassifier(cfg, {"a": TaskSpec(classes=["x", "y"]), "b": TaskSpec(classes=["p", "q", "r"])})


def tiny_batch(n=4):
    g = torch.Generator().manual_seed(1)
    media = {"imu": torch.randn(n, 200, 6, generator=g), "signal": torch.randn(n, 16, 32, generator=g)}
    return media, {m: torch.ones(n, dtype=torch.bool) for m in media}


def test_soft_sharing_penalty_is_the_squared_distance_to_the_mean():
    model = tiny_model("soft")
    assert model.penalty().item() == 0.0  # towers start equal
    with torch.no_grad():
        model.towers["a"].fusion.proj[0].bias[3] += 0.5
        model.towers["b"].trunk[0].net[1].weight[0, 0] -= 0.2
    # two towers differing by d in one entry each deviate d/2 from the mean: 2 * (d/2)^2 = d^2/2
    assert model.penalty().item() == pytest.approx(0.5**2 / 2 + 0.2**2 / 2, rel=1e-5)
    model.penalty().backward()
    grad = model.towers["a"].fusion.proj[0].bias.grad
    assert grad[3] == pytest.approx(0.5, rel=1e-4) and grad.abs().sum() == pytest.approx(0.5, rel=1e-4)


def test_hierarchical_heads_read_their_level():
    model = tiny_model(levels={"a": 0, "b": -1})
    media, present = tiny_batch()
    out = model(media, present)
    assert set(out["outputs"]) == {"a", "b"} and out["outputs"]["b"].shape == (4, 3)
    out["outputs"]["a"].sum().backward()
    trunk = [p.grad for p in model.tower.trunk.parameters()]
    assert all(g is None for g in trunk), "a level-0 task must not train the trunk above it"
    assert model.tower.fusion.proj[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="level 5 is outside the trunk"):
        tiny_model(levels={"a": 5})


def test_soft_towers_are_independent_in_the_forward_pass():
    model = tiny_model("soft")
    media, present = tiny_batch()
    model(media, present)["outputs"]["a"].sum().backward()
    assert all(p.grad is None for p in model.towers["b"].parameters())
    assert any(p.grad is not None for p in model.towers["a"].parameters())
