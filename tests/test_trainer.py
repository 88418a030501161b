"""The one Trainer with objectives other than the LM recipe: named losses are logged each with its own count, a
sampled objective (data2vec, with its EMA teacher) resumes exactly where it stopped, settings are checked."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from helpers import stopped_at
from mmalign.config import ConfigError, TrainConfig
from mmalign.contrastive.data2vec import Data2Vec, Data2VecObjective
from mmalign.contrastive.train import lit_settings
from mmalign.errors import CheckpointError
from mmalign.models.encoders import clip_encoder
from mmalign.train.trainer import OBJECTIVE_WEIGHTS, TRAINER_STATE, SampledObjective, Trainer, batch_generator

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=8)  # fmt: skip


class TwoLosses(SampledObjective):
    """Regression whose two named losses have different counts: rows for `fit`, elements for `small`."""

    name = "two"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, generator=g)
        super().__init__({"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5])})
        self.w = nn.Linear(3, 1)

    def counts(self, batch):
        return {"fit": len(batch["index"]), "small": len(batch["index"]) * 3}

    def losses(self, batch):
        return {"fit": ((self.w(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum(), "small": (batch["x"] * 0).sum()}


def settings(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{"out_dir": str(tmp_path), "max_steps": 40, "batch_size": 16, "lr": 0.05, "progress": False,
                          "log_every": 1, "warmup_ratio": 0.0, **kw})  # fmt: skip


def test_named_losses_are_logged_and_fall(tmp_path):
    torch.manual_seed(0)
    objective = TwoLosses()
    start = copy.deepcopy(objective.w)
    summary = Trainer(objective, settings(tmp_path, lr=0.1)).fit()
    # The first logged value is the mean over its count of batch 0 under the initial weights.
    idx = torch.randint(64, (16,), generator=batch_generator(0, 0))
    x, y = objective.rows["x"][idx], objective.rows["y"][idx]
    with torch.no_grad():
        assert summary["first_losses"]["fit"] == pytest.approx(((start(x).squeeze(-1) - y) ** 2).mean().item())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"fit", "small", "loss", "lr"} <= set(rows[0])
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["fit"] + rows[-1]["small"])
    assert summary["losses"]["fit"] < 0.1 * summary["first_losses"]["fit"]
    assert (tmp_path / OBJECTIVE_WEIGHTS).is_file() and (tmp_path / "summary.json").is_file()


def test_sampling_objective_without_max_steps_is_refused(tmp_path):
    with pytest.raises(ValueError, match="set train.max_steps"):
        Trainer(TwoLosses(), settings(tmp_path, max_steps=0))


def _data2vec(tmp_path, name):
    torch.manual_seed(0)
    model = Data2Vec(clip_encoder(config=dict(TINY)), mask_ratio=0.5, ema_start=0.9, ema_end=0.99)
    pixels = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return Data2VecObjective(model, pixels), settings(tmp_path / name, max_steps=6, batch_size=8, lr=1e-3)


def test_data2vec_resumes_exactly_after_an_interrupt(tmp_path):
    objective, cfg = _data2vec(tmp_path, "straight")
    Trainer(objective, cfg).fit()

    objective, cfg = _data2vec(tmp_path, "stopped")
    with stopped_at(3):
        Trainer(objective, cfg).fit()
    objective, cfg = _data2vec(tmp_path, "stopped")  # a fresh process: everything comes from the run folder
    Trainer(objective, cfg, resume=True).fit()

    a = load_file(tmp_path / "straight" / OBJECTIVE_WEIGHTS)
    b = load_file(tmp_path / "stopped" / OBJECTIVE_WEIGHTS)
    assert a.keys() == b.keys() and any(k.startswith("model.teacher.") for k in a)  # the EMA teacher is saved too
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_contrastive_settings_take_checked_overrides(tmp_path):
    cfg = lit_settings(tmp_path, 10, 8, 1e-3, 0, False, ["train.grad_accum=2", "train.precision=bf16"])
    assert cfg.grad_accum == 2 and cfg.precision == "bf16" and cfg.max_steps == 10
    with pytest.raises(ConfigError, match="train.precision"):
        lit_settings(tmp_path, 10, 8, 1e-3, 0, False, ["train.precision=fp8"])


def test_objective_weights_from_another_save_are_refused(tmp_path):
    import shutil

    Trainer(TwoLosses(), settings(tmp_path / "a", max_steps=2)).fit()
    Trainer(TwoLosses(), settings(tmp_path / "b", max_steps=3)).fit()
    shutil.copy(tmp_path / "a" / OBJECTIVE_WEIGHTS, tmp_path / "b" / OBJECTIVE_WEIGHTS)
    tail = r" \(files from different saves\); restart the run or restore a consistent copy$"
    with pytest.raises(RuntimeError, match=r"/b: weights are from step 2 but trainer_state\.pt from step 3" + tail):
        Trainer(TwoLosses(), settings(tmp_path / "b", max_steps=3), resume=True)


def test_all_reduce_sum_adds_named_numbers_over_ranks(tmp_path):
    import torch.distributed as dist

    from mmalign.train.trainer import all_reduce_sum

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert all_reduce_sum({"b": 2, "a": 1.5}) == {"a": 1.5, "b": 2.0}
        assert all_reduce_sum({"tokens": 2**24 + 1}) == {"tokens": 2**24 + 1}  # counts past float32's integers
    finally:
        dist.destroy_process_group()


def test_truncate_log_drops_rows_after_the_saved_step(tmp_path):
    from mmalign.train.trainer import truncate_log

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    truncate_log(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    truncate_log(log, 9)
    assert len(log.read_text().splitlines()) == 3
    log.write_text(json.dumps({"event": "start"}) + "\n" + log.read_text())  # a row without a step stays
    truncate_log(log, 0)
    assert log.read_text() == json.dumps({"event": "start"}) + "\n"


def test_gradients_are_clipped_to_clip_grad(tmp_path):
    trainer = Trainer(TwoLosses(), settings(tmp_path, max_steps=1, clip_grad=0.01))
    norms = []
    trainer.optimizer.step = lambda: norms.append(float(torch.cat([p.grad.flatten() for p in trainer.params]).norm()))
    trainer.scheduler.step = lambda: None
    trainer._step(trainer.objective.batches(trainer.state, trainer.cfg, print))
    assert norms == pytest.approx([0.01], rel=1e-4)


def test_run_settings_keep_the_out_dir_and_apply_overrides(tmp_path):
    from mmalign.train.trainer import run_settings

    cfg = run_settings(tmp_path / "out", ["train.lr=0.5"], max_steps=3)
    assert cfg.out_dir == str(tmp_path / "out") and cfg.lr == 0.5 and cfg.max_steps == 3


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_log_rows_fall_on_log_every_and_the_last_step_and_gradients_are_released(tmp_path):
    objective = TwoLosses()
    Trainer(objective, settings(tmp_path, max_steps=5, log_every=2)).fit()
    assert [r["step"] for r in _rows(tmp_path)] == [2, 4, 5]
    assert all(p.grad is None for p in objective.parameters())  # set to None after each step, not zeroed


def test_saved_weights_carry_the_safetensors_format_and_step(tmp_path):
    from safetensors import safe_open

    Trainer(TwoLosses(), settings(tmp_path, max_steps=2)).fit()
    with safe_open(tmp_path / OBJECTIVE_WEIGHTS, "pt") as fh:
        assert fh.metadata() == {"format": "pt", "step": "2"}  # transformers refuses files without format=pt
    if not torch.cuda.is_available():
        assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["cuda_rng"] is None


def test_resume_finishes_a_complete_staged_save_and_drops_rows_past_it(tmp_path):
    import shutil

    from mmalign.train.trainer import COMPLETE, STAGING, TRAINER_STATE

    run, later = tmp_path / "run", tmp_path / "later"
    Trainer(TwoLosses(), settings(run, max_steps=2)).fit()
    Trainer(TwoLosses(), settings(later, max_steps=3)).fit()
    # A run killed after its step-3 save was complete but before it was moved into place, and after it logged a
    # step no save holds.
    staging = run / STAGING
    staging.mkdir()
    for name in (OBJECTIVE_WEIGHTS, TRAINER_STATE):
        shutil.copy(later / name, staging / name)
    (staging / COMPLETE).write_text("3")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(_rows(later)[2]) + "\n" + json.dumps({"step": 4, "loss": -1.0}) + "\n")
    trainer = Trainer(TwoLosses(), settings(run, max_steps=4), resume=True)
    assert trainer.state["step"] == 3 and not staging.exists()
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]  # the unsaved step-4 row is gone
    trainer.fit()
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] > 0


def test_resuming_a_run_killed_before_its_summary_reports_no_loss(tmp_path):
    Trainer(TwoLosses(), settings(tmp_path, max_steps=2)).fit()
    (tmp_path / "summary.json").unlink()  # killed between the last save and the summary
    summary = Trainer(TwoLosses(), settings(tmp_path, max_steps=2), resume=True).fit()
    assert summary["steps"] == 2 and summary["losses"] == {} and summary["loss"] != summary["loss"]  # NaN
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def test_progress_bar_counts_steps_and_shows_the_losses(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=160, force_terminal=True)
    Trainer(TwoLosses(), settings(tmp_path, max_steps=3, progress=True), console=console).fit()
    import re

    # the objective's name, the bar, steps done of all, then each named loss and the learning rate
    assert re.search(r"two .* 3/3 fit [\d.]+ small [\d.]+ lr [\d.]+e[-+]\d\d", console.export_text())


def test_auto_precision_takes_bf16_only_on_a_cuda_device_that_has_it(monkeypatch):
    import contextlib

    from mmalign.train.trainer import autocast_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert isinstance(autocast_for("bf16", cpu), torch.autocast)
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert isinstance(autocast_for("auto", cpu), contextlib.nullcontext)
        assert isinstance(autocast_for("fp32", cuda), contextlib.nullcontext)
        with pytest.warns(UserWarning) if supported else contextlib.nullcontext():  # no CUDA here: it warns
            chosen = autocast_for("auto", cuda)
        assert isinstance(chosen, torch.autocast) == supported
        if supported:
            assert chosen.fast_dtype == torch.bfloat16


def test_to_device_moves_every_tensor_of_nested_batches():
    from mmalign.train.trainer import to_device

    batch = {"x": torch.ones(2), "media": {"image": torch.zeros(1, 3)}, "ids": ["a", "b"]}
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"].is_meta and moved["media"]["image"].is_meta and moved["ids"] == ["a", "b"]


def test_resume_without_a_saved_state_says_what_is_missing(tmp_path):
    missing = rf"^--resume: no trainer_state\.pt in {re.escape(str(tmp_path))}; nothing to resume$"
    with pytest.raises(FileNotFoundError, match=missing):
        Trainer(TwoLosses(), settings(tmp_path, max_steps=3), resume=True)


def test_objective_weights_that_are_cut_or_lack_a_tensor_are_refused(tmp_path):
    Trainer(TwoLosses(), settings(tmp_path, max_steps=2)).fit()
    path = tmp_path / OBJECTIVE_WEIGHTS
    good = path.read_bytes()
    weights = load_file(path)
    save_file({k: v for k, v in weights.items() if k != "w.bias"}, path, metadata={"format": "pt", "step": "2"})
    with pytest.raises(RuntimeError, match="w.bias"):
        Trainer(TwoLosses(), settings(tmp_path, max_steps=3), resume=True)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot be read \(SafetensorError: "):
        Trainer(TwoLosses(), settings(tmp_path, max_steps=3), resume=True)


RAN = []


class RunsCodeWhenLoaded:
    def __reduce__(self):
        return RAN.append, ("loaded",)


def test_a_trainer_state_that_would_run_code_is_refused_unrun(tmp_path):
    Trainer(TwoLosses(), settings(tmp_path, max_steps=2)).fit()
    path = tmp_path / TRAINER_STATE
    saved = torch.load(path, weights_only=True)
    saved["state"]["note"] = RunsCodeWhenLoaded()
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot be read \(UnpicklingError: "):
        Trainer(TwoLosses(), settings(tmp_path, max_steps=3), resume=True)
    assert RAN == []


class Noisy(TwoLosses):
    """Draws a further tensor per batch, as data2vec draws its masks."""

    def draw(self, generator):
        return {"noise": torch.rand(4, generator=generator)}


def test_sampled_batches_are_a_function_of_the_seed_and_cursor(tmp_path):
    cfg = settings(tmp_path)
    state = {"cursor": 0}
    torch.manual_seed(1)
    run = Noisy().batches(state, cfg, print)
    first = [next(run) for _ in range(3)]
    assert state["cursor"] == 3
    torch.manual_seed(2)  # the global generator plays no part
    resumed = Noisy().batches({"cursor": 2}, cfg, print)  # a run resumed after two batches
    third = next(resumed)
    for key in ("index", "x", "noise"):
        torch.testing.assert_close(third[key], first[2][key])
        assert not torch.equal(first[1][key], first[2][key])  # each batch its own draw


def test_objective_weights_without_a_step_stamp_load_and_report_none(tmp_path):
    obj = TwoLosses()
    obj.save(tmp_path, 5)
    path = tmp_path / OBJECTIVE_WEIGHTS
    assert obj.load(tmp_path) == 5
    save_file(load_file(path), path, metadata={"format": "pt"})  # written by something that does not stamp
    assert TwoLosses().load(tmp_path) is None


def test_sync_tree_flushes_every_file_and_folder_of_a_save(tmp_path, monkeypatch):
    """A save is committed only after everything staged is on disk: each file, each folder's entries, the root."""
    import os

    from mmalign.train import trainer

    (tmp_path / "tokenizer").mkdir()
    for name in ("model.safetensors", "tokenizer/vocab.json", "tokenizer/config.json"):
        (tmp_path / name).write_text("x")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(trainer.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or None)
    trainer.sync_tree(tmp_path)
    monkeypatch.setattr(trainer.os, "fsync", real_fsync)
    expected = ["model.safetensors", "tokenizer", "tokenizer/config.json", "tokenizer/vocab.json"]
    assert synced == [str(tmp_path / name) for name in expected] + [str(tmp_path)]
