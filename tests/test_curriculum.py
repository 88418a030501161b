"""Curricula: stages run in order from each other's weights, train only what they declare, replay a seeded share
of earlier data, print the plan, and skip finished stages on resume."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from mmalign.config import (
    ConfigError,
    DataConfig,
    EncoderConfig,
    LLMConfig,
    MediaConfig,
    ModelConfig,
    OneLLMConfig,
    RecipeConfig,
    StageConfig,
    TrainConfig,
    apply_overrides,
)
from mmalign.data.dataset import subset
from mmalign.train.curriculum import compact, run_curriculum, stage_recipe


def curriculum(base, shapes, tmp_path, **stage2) -> RecipeConfig:
    return RecipeConfig(
        model=ModelConfig(
            family="onellm",
            media={"image": MediaConfig()},
            llm=LLMConfig(path=str(base / "lm")),
            onellm=OneLLMConfig(
                encoder=EncoderConfig(path=str(base / "encoder"), feature_layer=-1, keep_cls=True),
                num_queries=4,
                expert_heads=2,
            ),
        ),
        data=DataConfig(image_folder=shapes["images"], template="chat"),
        train=TrainConfig(out_dir=str(tmp_path / "run"), batch_size=8, lr=3e-3, progress=False, warmup_ratio=0.0),
        stages=[
            StageConfig(name="captions", data=[shapes["captions"]], trainable=["tokenizer.image", "connector"]),
            StageConfig(name="chat", data=[shapes["conversations"]], **({"trainable": ["connector"]} | stage2)),
        ],
    )


def test_the_plan_names_groups_compactly():
    every = ["encoder", "tokenizer.image", "tokenizer.video", "tokenizer.audio", "connector.experts", "connector.image"]
    assert compact(["tokenizer.image", "connector.experts", "connector.image"], every) == "tokenizer.image, connector.*"
    assert compact(["encoder", "tokenizer.video", "tokenizer.audio"], every) == "encoder, tokenizer.{video, audio}"


def test_subset_takes_a_seeded_share_and_whole_passes():
    assert subset(10, 1.0, 0) == list(range(10))
    quarter = subset(100, 0.25, 3)
    assert len(quarter) == 25 and quarter == sorted(set(quarter)) and quarter == subset(100, 0.25, 3)
    assert quarter != subset(100, 0.25, 4)
    twice = subset(10, 2.5, 0)
    assert len(twice) == 25 and twice[:20] == list(range(10)) * 2


def test_stages_chain_freeze_replay_and_resume(base, shapes, tmp_path):
    cfg = curriculum(base, shapes, tmp_path, replay=0.5)
    counts = {shapes["captions"]: 40, shapes["conversations"]: 20}
    second = stage_recipe(cfg, 1, counts)
    assert second.data.train == [shapes["conversations"], shapes["captions"]]
    assert second.data.train_fractions == [1.0, 0.25]  # 10 replayed captions: half as many as the 20 new samples
    assert second.train.init_from == str(tmp_path / "run" / "1-captions")
    assert second.train.trainable == ["connector"]

    console = Console(record=True, width=200)
    summaries = run_curriculum(cfg, console=console)
    plan = console.export_text()
    assert "tokenizer.image, connector.*" in plan  # stage 1 trains
    assert "40 + 20" in plan  # stage 2: 40 conversations + 20 replayed captions
    assert [s["stage"] for s in summaries] == ["captions", "chat"]
    first = load_file(str(tmp_path / "run" / "1-captions" / "model.safetensors"))
    last = load_file(str(tmp_path / "run" / "2-chat" / "model.safetensors"))
    tokenizer_keys = [k for k in first if k.startswith("encoders.image.")]
    assert tokenizer_keys and all(torch.equal(first[k], last[k]) for k in tokenizer_keys)  # frozen in stage 2
    connector_keys = [k for k in first if k.startswith("upm.")]
    assert any(not torch.equal(first[k], last[k]) for k in connector_keys)  # trained in stage 2
    done = (tmp_path / "run" / "2-chat" / "stage.json").read_text()

    console = Console(record=True, width=200)
    again = run_curriculum(cfg, resume=True, console=console)
    assert console.export_text().count("done before, skipped") == 2
    assert (tmp_path / "run" / "2-chat" / "stage.json").read_text() == done
    assert [s["checkpoint"] for s in again] == [s["checkpoint"] for s in summaries]


def test_a_stage_without_data_or_with_a_bad_override_is_refused(base, shapes, tmp_path):
    cfg = curriculum(base, shapes, tmp_path)
    cfg.stages[1].data = []
    with pytest.raises(ConfigError, match="stages.1 \\(chat\\) names no training data"):
        stage_recipe(cfg, 1, {shapes["captions"]: 40})
    cfg = curriculum(base, shapes, tmp_path)
    apply_overrides(cfg, ["stages.1.overrides=[train.batch_sise=4]"])
    with pytest.raises(KeyError, match="train.batch_sise"):
        stage_recipe(cfg, 1, {shapes["captions"]: 40, shapes["conversations"]: 40})


def test_the_shipped_curriculum_loads_and_names_every_stage_group():
    from mmalign.config import load_recipe

    cfg = load_recipe("onellm_curriculum")
    assert [s.name for s in cfg.stages] == ["image", "video-audio-point", "depth-imu-signal", "instruct"]
    others = ["video", "audio", "point", "depth", "imu", "signal"]
    assert cfg.stages[-1].trainable == [f"tokenizer.{m}" for m in others] + ["connector", "llm"]
    # The image tokenizer is the universal tower's own patch embedding: no stage moves it.
    assert not any("tokenizer.image" in s.trainable or "tokenizer" in s.trainable for s in cfg.stages)
    assert cfg.model.onellm.queries == "pooled"
    assert set(cfg.model.media) == {"image", "video", "audio", "point", "depth", "imu", "signal"}
