"""Media of any modality through one data path: a sample carries image and audio, each with its own placeholder
and encoder; one modality may fuse several encoders; the declared parameter groups drive freezing and saving."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch

from helpers import TINY_LLAMA, TINY_VISION
from mmalign.config import (
    ConfigError,
    ConnectorConfig,
    DataConfig,
    EncoderConfig,
    LLMConfig,
    MediaConfig,
    ModelConfig,
    RecipeConfig,
    TrainConfig,
)
from mmalign.data.processor import SampleError, parse_record, processor_for
from mmalign.models.builder import build_model
from mmalign.train.checkpoint import load_checkpoint
from mmalign.train.freeze import select_groups, set_trainable
from mmalign.train.loop import train

TINY_AUDIO = dict(dim=32, depth=1, heads=4, seconds=0.128, max_frames=16)  # 1024 samples -> 9 frames


def image_audio_config(tokenizer_dir) -> ModelConfig:
    image = MediaConfig(encoder=EncoderConfig(name="clip", config=dict(TINY_VISION)))
    audio = MediaConfig(encoder=EncoderConfig(name="audio-transformer", config=dict(TINY_AUDIO)))
    llm = LLMConfig(config=dict(TINY_LLAMA), tokenizer=str(tokenizer_dir))
    return ModelConfig(media={"image": image, "audio": audio}, llm=llm)


def write_wav(path, pitch: float, seconds: float = 0.2, rate: int = 8000) -> None:
    t = np.arange(int(rate * seconds)) / rate
    samples = (0.8 * np.sin(2 * np.pi * pitch * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())


@pytest.fixture(scope="module")
def sounds(tmp_path_factory, shapes):
    """Records with an image and a sound each; the answer ("red" / "blue") is given by the sound's pitch alone."""
    folder = tmp_path_factory.mktemp("sounds")
    records = []
    for i in range(32):
        low = i % 2 == 0
        write_wav(folder / f"s{i}.wav", 300.0 if low else 1500.0)
        records.append(
            {
                "id": f"av-{i}",
                "image": f"{shapes['images']}/train_{i % 8:05d}.png",
                "audio": f"s{i}.wav",
                "conversations": [
                    {"from": "human", "value": "<image>\n<audio>\nwhat color is the shape ?"},
                    {"from": "gpt", "value": "red" if low else "blue"},
                ],
            }
        )
    (folder / "train.json").write_text(json.dumps(records))
    return folder


def test_processor_expands_each_modality_and_stacks_its_items(shapes, sounds):
    model, tok = build_model(image_audio_config(shapes["tokenizer"]))
    proc = processor_for(model, tok, DataConfig())
    conv = parse_record(json.loads((sounds / "train.json").read_text())[0], 0)
    assert set(conv.media) == {"image", "audio"}
    ids, labels = proc.tokenize(conv)
    for modality in ("image", "audio"):
        assert ids.count(model.media_token_ids[modality]) == model.tokens_per_item(modality)
    media = proc.media(conv, sounds)
    assert media["image"].shape == (1, 3, 32, 32)
    assert media["audio"].shape == (1, model.tokens_per_item("audio"), 129)  # (items, frames, bins)
    out = model(torch.tensor([ids]), media=media, labels=torch.tensor([labels]))
    assert out["n_tokens"] == 2  # "red" + eos


def test_a_sample_with_a_modality_the_model_does_not_read_is_an_error(shapes, sounds):
    cfg = image_audio_config(shapes["tokenizer"])
    del cfg.media["audio"]
    model, tok = build_model(cfg)
    record = json.loads((sounds / "train.json").read_text())[3]
    with pytest.raises(SampleError, match="av-3: has audio but this model reads only image"):
        processor_for(model, tok, DataConfig()).tokenize(parse_record(record, 3))


def test_image_and_audio_train_together_and_reload(shapes, sounds, tmp_path):
    cfg = RecipeConfig(
        model=image_audio_config(shapes["tokenizer"]),
        data=DataConfig(train=str(sounds / "train.json"), image_folder=str(sounds)),
        train=TrainConfig(
            out_dir=str(tmp_path / "run"), trainable=["encoder.audio", "connector", "llm"], max_steps=40,
            batch_size=8, lr=1e-2, warmup_ratio=0.0, progress=False, log_every=1,
        ),
    )  # fmt: skip
    train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
    # The answer lives in the sound only: swap each sound for the other pitch and the greedy answer flips.
    from mmalign.generate import generate

    model, tok, _ = load_checkpoint(tmp_path / "run")
    proc = processor_for(model, tok, cfg.data)
    records = json.loads((sounds / "train.json").read_text())[:2]
    convs = [parse_record(r, i) for i, r in enumerate(records)]
    media = [proc.media(c, sounds) for c in convs]
    prompts = [proc.prompt_ids(c) for c in convs]
    batch = {m: torch.cat([x[m] for x in media]) for m in ("image", "audio")}
    answers = generate(model, prompts, batch, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], max_new_tokens=3)
    swapped = batch | {"audio": batch["audio"].flip(0)}
    flipped = generate(model, prompts, swapped, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], max_new_tokens=3)
    assert [tok.decode(a).strip() for a in answers] == ["red", "blue"]
    assert [tok.decode(a).strip() for a in flipped] == ["blue", "red"]


def test_fused_encoders_concatenate_features_per_token(shapes):
    cfg = ModelConfig(
        media={
            "image": MediaConfig(
                encoder=EncoderConfig(name="clip", config=dict(TINY_VISION)),
                extra_encoders=[
                    EncoderConfig(name="siglip", config=dict(TINY_VISION, hidden_size=24, image_size=48, patch_size=12))
                ],
                connector=ConnectorConfig(name="linear"),
            )
        },
        llm=LLMConfig(config=dict(TINY_LLAMA), tokenizer=shapes["tokenizer"]),
    )
    model, _ = build_model(cfg)
    fused = model.encoders["image"]
    first, second = fused.encoders
    assert fused.hidden_size == 32 + 24 and fused.num_tokens == first.num_tokens == 16
    x = torch.randn(2, 3, 32, 32)  # preprocessed for the first (CLIP-normalised, 32 px) tower
    raw = x * torch.tensor(first.std).view(1, 3, 1, 1) + torch.tensor(first.mean).view(1, 3, 1, 1)
    for_second = (raw - 0.5) / 0.5  # SigLIP's normalisation ...
    for_second = torch.nn.functional.interpolate(for_second, size=48, mode="bicubic", align_corners=False)  # ... size
    with torch.no_grad():
        expected = torch.cat([first(x), second(for_second)], dim=-1)
        torch.testing.assert_close(fused(x), expected)


def _two_tower_config(tokenizer, fusion: dict, family: str = "projector") -> ModelConfig:
    second = EncoderConfig(name="siglip", config=dict(TINY_VISION, hidden_size=24, image_size=48, patch_size=12))
    image = MediaConfig(encoder=EncoderConfig(name="clip", config=dict(TINY_VISION)), extra_encoders=[second],
                        connector=ConnectorConfig(name="mlp2x_gelu", fusion=fusion))  # fmt: skip
    llm = LLMConfig(config=dict(TINY_LLAMA), tokenizer=tokenizer)
    return ModelConfig(family=family, media={"image": image}, llm=llm)


def test_connector_fuses_the_encoders_per_token_with_a_fusion_module(shapes, tmp_path):
    from mmalign.fusion.modules import GatedFusion
    from mmalign.train.checkpoint import save_checkpoint

    cfg = _two_tower_config(shapes["tokenizer"], {"name": "gated", "dim": 16})
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    connector = model.connectors["image"]
    assert isinstance(connector.fusion_module, GatedFusion) and connector.fusion_module.dims == {
        "encoder00": 32, "encoder01": 24}  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first, second = model.encoders["image"].encoders
        a, b = first(x), model.encoders["image"](x)[..., 32:]  # (2, 16, 32), (2, 16, 24)
        present = torch.ones(32, dtype=torch.bool)
        # Token by token: token t of item i is row i * 16 + t of the fusion's batch.
        fused = connector.fusion_module({"encoder00": a.reshape(32, 32), "encoder01": b.reshape(32, 24)},
                                        {"encoder00": present, "encoder01": present})  # fmt: skip
        expected = connector.projector(fused.view(2, 16, 16))
        torch.testing.assert_close(model.encode("image", x), expected)
        one = connector.fusion_module({"encoder00": a[1, 5:6], "encoder01": b[1, 5:6]},
                                      {"encoder00": present[:1], "encoder01": present[:1]})  # fmt: skip
        torch.testing.assert_close(fused[16 + 5], one[0])
    # The fusion trains with the connector while the towers stay frozen.
    set_trainable(model, ["connector"])
    model.encode("image", x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.fusion_module.parameters())
    assert all(p.grad is None for p in model.encoders.parameters())
    # It saves and reloads with the model.
    save_checkpoint(tmp_path / "ckpt", model, tok, cfg)
    reloaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode("image", x), model.encode("image", x))


def test_connector_fusion_settings_are_checked(shapes):
    with pytest.raises(ConfigError, match="extra_encoders"):
        build_model(ModelConfig(
            media={"image": MediaConfig(encoder=EncoderConfig(name="clip", config=dict(TINY_VISION)),
                                        connector=ConnectorConfig(fusion={"name": "gated"}))},
            llm=LLMConfig(config=dict(TINY_LLAMA), tokenizer=shapes["tokenizer"])))  # fmt: skip
    with pytest.raises(ConfigError, match="name='nope': registered fusion modules are .*gated"):
        build_model(_two_tower_config(shapes["tokenizer"], {"name": "nope"}))
    with pytest.raises(ConfigError, match="unknown key.*'width'"):
        build_model(_two_tower_config(shapes["tokenizer"], {"name": "gated", "width": 3}))
    with pytest.raises(ConfigError, match="projector family, not flamingo"):
        build_model(_two_tower_config(shapes["tokenizer"], {"name": "gated"}, family="flamingo"))


def test_groups_select_by_prefix_and_unknown_names_fail(shapes):
    model, _ = build_model(image_audio_config(shapes["tokenizer"]))
    assert set(model.param_groups()) == {"encoder.image", "encoder.audio", "connector.image", "connector.audio", "llm"}
    assert select_groups(model, ["encoder"]) == ["encoder.image", "encoder.audio"]
    set_trainable(model, ["connector", "encoder.audio"])
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connectors.image", "connectors.audio", "encoders.audio"}
    with pytest.raises(ConfigError, match="'vision', which selects no group"):
        select_groups(model, ["vision"])


def test_float32_media_are_cast_to_a_bf16_model_for_every_encoder(shapes):
    # HF vision towers cast their input themselves; mmalign's own encoders rely on encode() to do it.
    model = build_model(image_audio_config(shapes["tokenizer"]))[0].to(torch.bfloat16)
    sound = torch.randn(2, 9, 129)  # (items, frames, features per frame)
    with torch.no_grad():
        got = model.encode("audio", sound)
        want = model.encode("audio", sound.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
