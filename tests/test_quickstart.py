"""The quickstart pipeline end to end, shrunk: the model must beat the blind baseline and the majority answer on
held-out images (the full-size figures are in the README, from `mmalign quickstart`), on the embedded shapes data
and on a user's own LLaVA-format files (the glyphs data, written to disk and passed as files)."""

from __future__ import annotations

import json

import pytest
import yaml

from mmalign.config import ConfigError
from mmalign.data.glyphs import write_glyphs_dataset
from mmalign.quickstart import run_quickstart, split_stages, stage_overrides

SMALL = dict(vision_steps=150, lm_steps=80, stage1_epochs=1, stage2_epochs=3, progress=False)


def test_quickstart_learns_to_see(tmp_path):
    result = run_quickstart(tmp_path / "run", embedded_dir=tmp_path / "data", n_train=600, **SMALL)
    assert result["accuracy"] > result["blind_accuracy"] + 0.2
    assert result["accuracy"] > result["majority_accuracy"] + 0.15
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["accuracy"] == result["accuracy"]
    assert (tmp_path / "run" / "stage2" / "model.safetensors").is_file()


def test_quickstart_on_a_users_files(tmp_path):
    """No tokenizer, no scenes: only LLaVA files and an image folder, as a user would have them."""
    paths = write_glyphs_dataset(tmp_path / "glyphs", n_train=800, n_val=10, n_test=60)
    result = run_quickstart(
        tmp_path / "run",
        [paths["captions"], paths["conversations"]],
        paths["test"],
        paths["images"],
        overrides=["train.warmup_ratio=0.1", "stage2.train.weight_decay=0.01"],  # as `--set` passes them
        **SMALL,
    )
    assert (tmp_path / "run" / "base" / "tokenizer" / "tokenizer.json").is_file()  # trained on the data's text
    ran = {
        s: yaml.safe_load((tmp_path / "run" / s / "train_config.yaml").read_text())["train"]
        for s in ("stage1", "stage2")
    }
    assert ran["stage1"]["warmup_ratio"] == ran["stage2"]["warmup_ratio"] == 0.1
    assert (ran["stage1"]["weight_decay"], ran["stage2"]["weight_decay"]) == (0.0, 0.01)
    stage2_data = yaml.safe_load((tmp_path / "run" / "stage2" / "train_config.yaml").read_text())["data"]["train"]
    assert stage2_data == [str(tmp_path / "run" / "base" / f) for f in ("stage2.json", "stage1.json")]  # + captions
    assert result["accuracy"] > result["blind_accuracy"] + 0.1
    assert result["accuracy"] > result["majority_accuracy"] + 0.08


def test_stage_overrides_pick_a_stage_or_both_and_are_checked():
    one, two = stage_overrides(["stage1.train.lr=1e-2", "stage2.train.epochs=10", "train.seed=3"])
    assert one == ["train.lr=1e-2", "train.seed=3"] and two == ["train.epochs=10", "train.seed=3"]
    with pytest.raises(KeyError, match="train.epoch"):
        stage_overrides(["stage2.train.epoch=10"])
    with pytest.raises(ConfigError, match="train.lr"):
        stage_overrides(["train.lr=fast"])


def test_records_split_into_caption_and_conversation_stages(tmp_path):
    cap = {
        "id": "c",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
    }
    conv = {"id": "v", "image": "a.png", "conversations": cap["conversations"] * 2}
    (tmp_path / "data.json").write_text(json.dumps([cap, conv]))
    stages = split_stages([tmp_path / "data.json"], tmp_path / "out")
    assert [r["id"] for r in json.loads(stages["stage1"].read_text())] == ["c"]
    assert [r["id"] for r in json.loads(stages["stage2"].read_text())] == ["v"]
    (tmp_path / "qa.json").write_text(json.dumps([conv]))  # no caption-like records: both stages read everything
    stages = split_stages([tmp_path / "qa.json"], tmp_path / "out2")
    assert stages["captions"] is None and json.loads(stages["stage1"].read_text()) == [conv]


def test_quickstart_flamingo_family_learns_to_see_and_learns_in_context(tmp_path):
    """`mmalign quickstart --family flamingo`: the same stage 0, then the Flamingo recipes (encoder and LM
    frozen); the trained model is a flamingo checkpoint that beats the blind baseline on held-out questions. Stage 3
    (episodes whose attribute only the demonstrations reveal) makes shots pay: 4 shots beat the bare query."""
    from mmalign.train.checkpoint import load_checkpoint

    small = SMALL | {"stage2_epochs": 6}  # cross-attention from closed gates needs a few more epochs than a projector
    result = run_quickstart(tmp_path / "run", embedded_dir=tmp_path / "data", n_train=600, family="flamingo",
                            n_episodes=1500, fewshot_epochs=2, fewshot_limit=150, **small)  # fmt: skip
    assert load_checkpoint(tmp_path / "run" / "stage2")[2].family == "flamingo"
    assert result["accuracy"] > result["blind_accuracy"] + 0.12  # seen here: 54.6% vs blind 33.6%, majority 38.9%
    assert result["accuracy"] > result["majority_accuracy"] + 0.1
    shots = result["fewshot"]["shots"]
    assert result["fewshot"]["zero_shot"] == "none"
    assert shots[4] > shots[0] + 0.2 and shots[2] > shots[0] + 0.2
    assert result["fewshot"]["vqa_accuracy"] > result["majority_accuracy"] + 0.05  # the mixture keeps its VQA
