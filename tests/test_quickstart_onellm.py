"""`mmalign quickstart --family onellm --compare` end to end at a tiny size: every modality written, stage 0, the
shipped curriculum's four stages, the per-modality table with its baselines and the image accuracy after stage 1,
and the same curriculum for the projector family beside it."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from mmalign.data.multimodal import synthetic_modalities
from mmalign.quickstart_onellm import run_onellm_quickstart


def unboxed(text: str) -> str:
    """A CLI error without the panel rich draws around it: words joined by single spaces."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.slow
def test_onellm_quickstart_runs_the_curriculum_and_reports_every_modality(tmp_path):
    sizes = dict(n_train=24, n_test=3, vision_steps=10, lm_steps=20, bind_steps=5, epochs=1)
    first = run_onellm_quickstart(tmp_path / "out", tmp_path / "data", **sizes, progress=False,
                                  console=Console(width=200))  # fmt: skip
    assert "projector" not in first
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.safetensors")}
    # --compare --resume on the finished run: stage 0 and the onellm curriculum are kept, only the twin trains.
    console = Console(record=True, width=200)
    result = run_onellm_quickstart(tmp_path / "out", tmp_path / "data", **sizes, compare=True, resume=True,
                                   progress=False, console=console)  # fmt: skip
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())
    text = console.export_text()
    said = " ".join(text.split())
    kept = ["the image tower", "the LM", *(f"the {m} tokenizer" for m in synthetic_modalities() if m != "image")]
    assert "kept from the stopped run" in said and all(part in said for part in kept)
    assert result["modalities"] == first["modalities"]
    modalities = synthetic_modalities()
    assert set(result["modalities"]) == set(modalities)
    for row in result["modalities"].values():
        assert row["n"] > 0 and 0.0 <= row["model"] <= 1.0 and 0.0 <= row["blind"] <= 1.0
    assert result["image_after_image_stage"] is not None
    stages = [p.split("/")[-1] for p in result["stages"]]
    assert stages == ["1-image", "2-video-audio-point", "3-depth-imu-signal", "4-instruct"]
    # Stage 2 trains the video tokenizer and leaves the image tokenizer as stage 1 left it.
    first, second = (load_file(f"{p}/model.safetensors") for p in result["stages"][:2])
    image_keys = [k for k in first if k.startswith("encoders.image.")]
    assert image_keys and all((first[k] == second[k]).all() for k in image_keys)
    assert any(not (first[k] == second[k]).all() for k in second if k.startswith("encoders.video."))
    assert all(m in text for m in modalities) and "after the image stage" in text
    assert json.loads((tmp_path / "out" / "results.json").read_text())["checkpoint"] == result["checkpoint"]
    # The projector twin: one encoder and MLP per modality; the image tower frozen, the other encoders trained.
    twin = result["projector"]
    assert set(twin["modalities"]) == set(modalities) and "wins" in text
    assert twin["trained_params"]["projector"] > 0 and twin["trained_params"]["onellm"] > 0
    saved = load_file(f"{twin['checkpoint']}/model.safetensors")
    assert any(k.startswith("encoders.video.") for k in saved)
    assert not any(k.startswith("encoders.image.") for k in saved)  # the frozen tower reloads from its path


@pytest.mark.slow
def test_onellm_quickstart_on_a_pretrained_siglip_tower(tmp_path):
    """`--encoder PATH`: a Hugging Face SigLIP tower (no CLS token, its own normalisation) replaces stage 0's LiT
    tower as the universal encoder; every tokenizer binds through it and the curriculum trains on top of it."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from helpers import TINY_VISION

    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION))
    tower.save_pretrained(tmp_path / "siglip")
    console = Console(record=True, width=200)
    sizes = dict(n_train=12, n_test=2, lm_steps=10, bind_steps=3, epochs=1, limit=2)
    result = run_onellm_quickstart(tmp_path / "out", tmp_path / "data", encoder=tmp_path / "siglip", **sizes,
                                   progress=False, console=console)  # fmt: skip
    assert set(result["modalities"]) == set(synthetic_modalities())
    assert not (tmp_path / "out" / "base" / "contrastive").exists()  # no LiT
    assert "siglip tower" in console.export_text()
    config = yaml.safe_load((tmp_path / "out" / "curriculum" / "4-instruct" / "model_config.yaml").read_text())
    universal = config["onellm"]["encoder"]
    assert universal["name"] == "siglip" and universal["path"] == str(tmp_path / "siglip") and not universal["keep_cls"]
    # The universal encoder stayed the given tower: frozen in every stage.
    saved = load_file(f"{result['checkpoint']}/model.safetensors")
    assert not any(k.startswith("universal.") for k in saved)


def test_cli_checks_the_encoder_and_resume_before_running(tmp_path):
    from typer.testing import CliRunner

    from mmalign.cli import app

    runner = CliRunner()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = runner.invoke(app, ["quickstart", "--family", "onellm", "--encoder", str(tmp_path / "llama")])
    assert out.exit_code == 2 and "not a CLIP or SigLIP" in unboxed(out.output)
    out = runner.invoke(app, ["quickstart", "--encoder", str(tmp_path / "llama")])
    assert out.exit_code == 2 and "--family onellm" in unboxed(out.output)
    out = runner.invoke(app, ["quickstart", "--resume", "--out", str(tmp_path / "z")])
    assert out.exit_code == 2 and "use it with --family onellm" in unboxed(out.output)
    assert not (tmp_path / "z").exists()


def test_overrides_reach_the_curriculum_and_bad_ones_stop_the_cli(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from typer.testing import CliRunner

    from helpers import TINY_VISION
    from mmalign.cli import app
    from mmalign.quickstart_onellm import CURRICULUM, curriculum_recipe

    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "tower")
    base = {"encoder": tmp_path / "tower", "lm": tmp_path / "lm", "tokenizers": tmp_path / "toks"}
    sets = ["data.group_by_modality=true", "train.lr=1e-3"]
    cfg = curriculum_recipe(CURRICULUM, tmp_path, base, tmp_path / "out", 0, False, overrides=sets)
    assert cfg.data.group_by_modality and cfg.train.lr == 1e-3
    assert cfg.model.onellm.encoder.path == str(tmp_path / "tower")  # the run's own settings stay
    runner = CliRunner()
    for bad, says in (("data.bogus=1", "unknown config key"), ("train.lr=abc", "expected float")):
        out = runner.invoke(app, ["quickstart", "--family", "onellm", "--set", bad, "--out", str(tmp_path / "x")])
        assert out.exit_code == 2 and says in unboxed(out.output)
        assert not (tmp_path / "x").exists()  # nothing ran
    out = runner.invoke(app, ["quickstart", "--set", "stage2.data.bogus=1", "--out", str(tmp_path / "y")])
    assert out.exit_code == 2 and "unknown config key 'data.bogus'" in unboxed(out.output)  # the projector recipes
    assert not (tmp_path / "y").exists()
