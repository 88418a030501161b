"""Configs: YAML round trip, typed overrides, errors that name the key, and every shipped recipe loads."""

from __future__ import annotations

from importlib import resources

import pytest

from mmalign.config import RecipeConfig, apply_overrides, describe, load_yaml, save_yaml


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(RecipeConfig(), ["train.lr=2e-5", "model.connector.name=linear", "train.trainable=[llm]"])
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
        cfg = load_yaml(resources.files("mmalign") / "recipes" / name)
        assert set(cfg.train.trainable) <= {"encoder", "connector", "llm"}


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
