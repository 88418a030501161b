"""The onellm family: the UPM's mixture equations, training and reloading on images, and a modality registered
in the test itself (no library code touched) training beside images in mixed batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmalign.config import (
    ConfigError,
    DataConfig,
    EncoderConfig,
    LLMConfig,
    MediaConfig,
    ModelConfig,
    OneLLMConfig,
    RecipeConfig,
    TrainConfig,
)
from mmalign.modalities.base import MODALITIES, MediaError, Modality
from mmalign.models.builder import build_model
from mmalign.models.upm import UniversalProjection
from mmalign.train.checkpoint import load_checkpoint
from mmalign.train.loop import train


def onellm_recipe(base, tmp_path, media: dict, train_file, folder, **train_kw) -> RecipeConfig:
    return RecipeConfig(
        model=ModelConfig(
            family="onellm",
            media={m: MediaConfig() for m in media},
            llm=LLMConfig(path=str(base / "lm")),
            onellm=OneLLMConfig(
                encoder=EncoderConfig(path=str(base / "encoder"), feature_layer=-1, keep_cls=True),
                num_queries=4,
                expert_heads=2,
            ),
        ),
        data=DataConfig(train=train_file, image_folder=str(folder), template="chat"),
        train=TrainConfig(
            **{"out_dir": str(tmp_path / "run"), "batch_size": 8, "lr": 3e-3, "progress": False, "log_every": 1,
               "trainable": ["tokenizer", "connector", "llm"], "warmup_ratio": 0.0, **train_kw}
        ),
    )  # fmt: skip


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_upm_mixes_experts_by_the_router_and_adds_tags(router):
    torch.manual_seed(0)
    upm = UniversalProjection(8, 6, ["a", "b"], num_experts=3, num_queries=5, heads=2, router=router).eval()
    feats = torch.randn(2, 7, 8)
    out = upm("a", feats)
    assert out.shape == (2, 7, 6)  # 5 queries between the start and end tags
    assert torch.equal(out[:, 0], upm.modal["a"].start.expand(2, -1))
    assert torch.equal(out[:, -1], upm.modal["a"].end.expand(2, -1))
    weights = upm.router_weights("a", feats)
    assert weights.shape == (2, 5, 3) and torch.allclose(weights.sum(-1), torch.ones(2, 5))
    # The router reads each query plus the mean input token: two inputs get their own weights.
    p = upm.modal["a"]
    x = torch.cat([p.queries.expand(2, -1, -1), p.proj_in(feats)], 1)
    by_hand = p.router(x[:, :5] + x[:, 5:].mean(1, keepdim=True))
    by_hand = by_hand.softmax(-1) if router == "softmax" else by_hand.sigmoid() / by_hand.sigmoid().sum(-1, True)
    assert torch.allclose(weights, by_hand, atol=1e-6)
    assert not torch.allclose(weights[0], weights[1], atol=1e-4)
    # The mixture by hand: sum_k w_k * expert_k over [queries; proj_in(features)], read at the queries.
    mixed = sum(weights[..., k : k + 1] * e(x)[:, :5] for k, e in enumerate(upm.experts))
    assert torch.allclose(out[:, 1:-1], p.proj_out(mixed), atol=1e-6)
    # A router that always picks expert 2 gives expert 2's output alone; modality b's router is its own.
    with torch.no_grad():
        p.router[-1].weight.zero_()
        p.router[-1].bias.copy_(torch.tensor([-30.0, -30.0, 30.0]))
    assert torch.allclose(upm("a", feats)[:, 1:-1], p.proj_out(upm.experts[2](x)[:, :5]), atol=1e-5)
    assert not torch.allclose(upm("b", feats)[:, 1:-1], upm.modal["b"].proj_out(upm.experts[2](x)[:, :5]))


def test_upm_routing_on_bare_queries_gives_one_set_of_weights_per_modality():
    """OneLLM's released code: the router reads the learned queries only, so every input gets the same weights."""
    torch.manual_seed(0)
    upm = UniversalProjection(8, 6, ["a", "b"], num_queries=5, heads=2, route_on="queries").eval()
    weights = upm.router_weights("a", torch.randn(3, 7, 8))
    assert torch.allclose(weights[0], weights[1]) and torch.allclose(weights[0], weights[2])
    assert not torch.allclose(weights[0], upm.router_weights("b", torch.randn(1, 7, 8))[0])
    with pytest.raises(ValueError, match="route_on='pooled'"):
        UniversalProjection(8, 6, ["a"], route_on="pooled")


def test_onellm_aligns_images_and_reloads(base, shapes, tmp_path):
    cfg = onellm_recipe(base, tmp_path, {"image": {}}, shapes["conversations"], shapes["images"], epochs=8)
    model, _ = build_model(cfg.model)
    groups = set(model.param_groups())
    assert groups == {"encoder", "tokenizer.image", "connector.experts", "connector.image", "llm"}
    train(cfg)
    seen = losses(tmp_path / "run")
    assert np.mean(seen[-3:]) < 0.7 * np.mean(seen[:3])
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    # The frozen universal encoder reloads from its path; the tokenizer, the UPM and the trained LLM are saved.
    assert not any(k.startswith("universal.") for k in saved) and any(k.startswith("llm.") for k in saved)
    assert any(k.startswith("upm.experts.") for k in saved) and any(k.startswith("encoders.image.") for k in saved)
    reloaded, tok, model_cfg = load_checkpoint(tmp_path / "run")
    assert model_cfg.family == "onellm" and reloaded.tokens_per_item("image") == 4 + 2
    ids = torch.tensor([[tok.bos_token_id] + [reloaded.media_token_ids["image"]] * 6 + [5, 6]])
    pixels = torch.randn(1, 3, 32, 32)
    first = reloaded(ids, media={"image": pixels})["logits"]
    again, _, _ = load_checkpoint(tmp_path / "run")
    assert torch.equal(first, again(ids, media={"image": pixels})["logits"])


class ToyTokenizer(nn.Module):
    """A 16-value signal as 4 tokens of 4 values each, projected to the universal encoder's width."""

    def __init__(self, universal, settings):
        super().__init__()
        self.proj = nn.Linear(4, universal.hidden_size)
        self.num_tokens = 4

    def forward(self, x):
        return self.proj(x.view(len(x), 4, 4))


def load_toy(source):
    values = np.load(source) if not isinstance(source, np.ndarray) else source
    if values.shape != (16,) or not np.isfinite(values).all():
        raise MediaError(f"a signal is 16 finite values; got shape {values.shape}")
    return values


TOY = Modality(
    name="toy",
    placeholder="<toy>",
    record_key="toy",
    default_encoder="none",
    load=load_toy,
    preprocess=lambda raw, tokenizer: torch.tensor(raw, dtype=torch.float32),
    tokenizer=ToyTokenizer,
)


def test_a_modality_registered_in_the_test_trains_beside_images(base, shapes, tmp_path, monkeypatch):
    monkeypatch.setitem(MODALITIES._builders, "toy", TOY)
    rng = np.random.default_rng(0)
    records = []
    for i in range(64):  # the answer is the sign of the signal's mean
        values = rng.normal(1.0 if i % 2 else -1.0, 0.5, 16).astype(np.float32)
        np.save(tmp_path / f"s{i}.npy", values)
        records.append({"id": f"sig-{i}", "toy": f"s{i}.npy", "conversations": [
            {"from": "human", "value": "<toy>\nwhat size is the shape ?"},
            {"from": "gpt", "value": "large" if i % 2 else "small"}]})  # fmt: skip
    images = json.loads(open(shapes["conversations"]).read())[:32]
    for r in images:  # absolute image paths, so one media folder serves both modalities
        r["image"] = f"{shapes['images']}/{r['image']}"
    records.append({"id": "bad", "toy": "s0.npy", "conversations": [
        {"from": "human", "value": "<toy><toy>\nwhat size ?"}, {"from": "gpt", "value": "small"}]})  # fmt: skip
    (tmp_path / "mixed.json").write_text(json.dumps(records + images))
    cfg = onellm_recipe(base, tmp_path, {"image": {}, "toy": {}}, str(tmp_path / "mixed.json"), tmp_path, epochs=6)
    train(cfg)
    seen = losses(tmp_path / "run")
    assert np.mean(seen[-3:]) < 0.6 * np.mean(seen[:3])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"] == 6  # two placeholders, one toy item: skipped and counted in each of 6 epochs
    model, _, _ = load_checkpoint(tmp_path / "run")
    toy = torch.tensor(np.stack([np.load(tmp_path / f"s{i}.npy") for i in range(4)]))
    weights = model.router_weights("toy", toy)
    assert weights.shape == (4, 4, 3) and torch.allclose(weights.sum(-1), torch.ones(4, 4))


def test_a_modality_without_a_tokenizer_is_refused(shapes, monkeypatch):
    plain = Modality(name="plain", placeholder="<plain>", record_key="plain", default_encoder="clip",
                     load=lambda s: s, preprocess=lambda raw, enc: raw)  # fmt: skip
    monkeypatch.setitem(MODALITIES._builders, "plain", plain)
    cfg = ModelConfig(family="onellm", media={"plain": MediaConfig()}, llm=LLMConfig(tokenizer=shapes["tokenizer"]))
    with pytest.raises(ConfigError, match="plain modality registers no onellm tokenizer"):
        build_model(cfg)


def test_pooled_queries_start_from_their_own_stretch_of_the_input():
    """`queries="pooled"`: query i is its learned vector plus the mean of the i-th run of input tokens, so a change
    to one end of the input reaches the queries that read that end, and no others."""
    torch.manual_seed(0)
    upm = UniversalProjection(8, 6, ["a"], num_queries=3, heads=2, queries="pooled").eval()
    p = upm.modal["a"]
    feats = torch.randn(2, 6, 8)
    x = upm._inputs("a", feats)
    tokens = p.proj_in(feats)
    by_hand = torch.stack([tokens[:, 2 * i : 2 * i + 2].mean(1) for i in range(3)], 1) + p.queries
    assert torch.allclose(x[:, :3], by_hand, atol=1e-6) and torch.equal(x[:, 3:], tokens)
    moved = feats.clone()
    moved[:, -1] += 5.0
    delta = (upm._inputs("a", moved) - x)[:, :3].abs().amax((0, 2))
    assert delta[2] > 0.1 and torch.equal(delta[:2], torch.zeros(2))
    learned = UniversalProjection(8, 6, ["a"], num_queries=3, heads=2).eval()
    assert torch.equal(learned._inputs("a", feats)[:, :3], learned.modal["a"].queries.expand(2, -1, -1))
    with pytest.raises(ValueError, match="queries='mean'"):
        UniversalProjection(8, 6, ["a"], queries="mean")
