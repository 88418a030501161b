"""Configs: YAML round trip, typed overrides, errors that name the key, and every shipped recipe loads."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from mmalign.config import RecipeConfig, apply_overrides, describe, load_yaml, save_yaml
from mmalign.fusion.config import ClassifierRecipe


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(
        RecipeConfig(), ["train.lr=2e-5", "model.media.image.connector.name=linear", "train.trainable=[llm]"]
    )
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml") == cfg


def test_overrides_are_typed():
    cfg = apply_overrides(
        RecipeConfig(),
        [
            "train.lr=1",
            "train.batch_size=4",
            "train.progress=false",
            "data.val=null",
            "model.llm.config.hidden_size=64",
        ],
    )
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 4 and cfg.train.progress is False
    assert cfg.data.val is None
    assert cfg.model.llm.config == {"hidden_size": 64}


@pytest.mark.parametrize(
    "override, error",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("nope.x=1", "unknown config key 'nope.x'"),
        ("train.batch_size=many", "train.batch_size"),
        ("train.lr", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, error):
    with pytest.raises((KeyError, ValueError), match=error):
        apply_overrides(RecipeConfig(), [override])


def test_unknown_yaml_key_is_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(KeyError, match="train.learning_rate"):
        load_yaml(tmp_path / "c.yaml")


def test_every_shipped_recipe_loads():
    names = [p.name for p in (resources.files("mmalign") / "recipes").iterdir() if p.name.endswith(".yaml")]
    assert "shapes_stage1.yaml" in names and "shapes_stage2.yaml" in names
    for name in names:
        if name.startswith("classify_"):  # classifier recipes (`mmalign classify train`) have their own schema
            cfg = load_yaml(resources.files("mmalign") / "recipes" / name, ClassifierRecipe)
            assert cfg.model.encoders and cfg.model.fusion.name
            continue
        cfg = load_yaml(resources.files("mmalign") / "recipes" / name)
        assert set(cfg.train.trainable) <= {"encoder", "connector", "llm", "llm.xattn", "llm.new_tokens"}


def test_every_key_is_documented():
    rows = describe()
    assert all(help_text for _, _, help_text in rows)
    assert "train.lr" in {key for key, _, _ in rows}


def test_string_keys_keep_the_text_and_dicts_nest():
    cfg = apply_overrides(
        RecipeConfig(),
        ["data.image_folder=1.10", "train.out_dir=no", "model.llm.config.rope_scaling.factor=2", "data.val=null"],
    )
    assert cfg.data.image_folder == "1.10" and cfg.train.out_dir == "no"
    assert cfg.model.llm.config == {"rope_scaling": {"factor": 2}}
    assert cfg.data.val is None


@pytest.mark.parametrize(
    "override, error",
    [
        ("train.precision=fp8", "train.precision='fp8': choose one of 'auto', 'bf16', 'fp32'"),
        ("data.on_error=ignore", "data.on_error='ignore': choose one of 'skip', 'raise'"),
        ("data.template=vicuna", "data.template='vicuna': choose one of"),
        ("train.finetune=prefix", "train.finetune='prefix': choose one of 'full', 'lora', 'dora', 'qlora'"),
        ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
        ("train.batch_size=-2", "train.batch_size=-2: must be >= 1"),
        ("train.max_steps=-5", "train.max_steps=-5: must be >= 0"),
        ("train.lr=-1", "train.lr=-1.0: must be > 0"),
        ("train.lora.r=0", "train.lora.r=0: must be >= 1"),
    ],
)
def test_choices_and_ranges_are_checked_before_anything_is_built(override, error):
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(error)):
        apply_overrides(RecipeConfig(), [override])


def test_bad_choice_in_yaml_names_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  precision: fp8\n")
    with pytest.raises(ValueError, match="train.precision='fp8'"):
        load_yaml(tmp_path / "c.yaml")


def test_lora_set_on_the_model_with_full_finetuning_is_an_error():
    from mmalign.config import ConfigError, check_recipe

    cfg = apply_overrides(RecipeConfig(), ["model.lora.r=8", "train.trainable=[connector,llm]"])
    with pytest.raises(ConfigError, match="model.lora is set but train.finetune is 'full'"):
        check_recipe(cfg)
    with pytest.raises(ConfigError, match=r"train.trainable=\[.connector.\] trains none of them"):
        check_recipe(apply_overrides(RecipeConfig(), ["train.finetune=lora", "train.trainable=[connector]"]))


def test_media_entries_and_encoder_lists_are_reached_by_name_and_index():
    cfg = apply_overrides(
        RecipeConfig(),
        [
            "model.media.audio.encoder.name=audio-transformer",
            "model.media.image.extra_encoders.0.name=siglip",
            "model.media.image.extra_encoders.0.path=towers/siglip",
        ],
    )
    assert cfg.model.media["audio"].encoder.name == "audio-transformer"
    assert cfg.model.media["audio"].connector.name == "mlp2x_gelu"  # a new modality starts from the defaults
    assert [e.path for e in cfg.model.media["image"].extra_encoders] == ["towers/siglip"]
    with pytest.raises(KeyError, match="not an index"):
        apply_overrides(RecipeConfig(), ["model.media.image.extra_encoders.2.name=siglip"])


def test_unregistered_names_fail_before_building(shapes):
    from helpers import tiny_model_config
    from mmalign.config import ConfigError
    from mmalign.models.builder import build_model

    for override, error in [
        ("model.family=kosmos", "model.family='kosmos': registered families are flamingo, onellm, projector"),
        ("model.media.smell.encoder.name=clip", "model.media.smell: unknown modality 'smell'"),
        ("model.media.image.encoder.name=dino", "model.media.image.encoder.name='dino'"),
        ("model.media.image.connector.name=qformer", "model.media.image.connector.name='qformer'"),
    ]:
        cfg = RecipeConfig(model=tiny_model_config(shapes["tokenizer"]))
        with pytest.raises(ConfigError, match=re.escape(error)):
            build_model(apply_overrides(cfg, [override]).model)
