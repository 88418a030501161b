"""What happens when things go wrong: a resumed run refuses a changed config, a finished run resumes to its own
summary, an unreadable checkpoint file is named, export and import never write over a user's folder, and the
command line prints one clear line instead of a traceback."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import stopped_at
from mmalign.cli import app
from mmalign.config import ConfigError, save_yaml
from mmalign.errors import CheckpointError
from mmalign.train.checkpoint import load_checkpoint
from mmalign.train.loop import train
from test_train import recipe


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.fixture
def stopped(base, shapes, tmp_path):
    """A run interrupted after step 3 of 6 (saved there), and its config."""
    cfg = recipe(base, shapes, tmp_path, max_steps=6, batch_size=4)
    with stopped_at(3):
        train(cfg)
    return cfg


def test_resume_refuses_keys_that_shape_the_run_and_names_them(stopped):
    before = digest(Path(stopped.train.out_dir))
    changed = replace(stopped, train=replace(stopped.train, lr=0.5, batch_size=8))
    with pytest.raises(ConfigError, match=r"train\.batch_size: 4 -> 8; train\.lr: 0\.003 -> 0\.5"):
        train(changed, resume=True)
    assert digest(Path(stopped.train.out_dir)) == before  # nothing written


def test_resume_allows_logging_and_evaluation_changes_and_says_so(stopped, capsys):
    from rich.console import Console

    changed = replace(stopped, train=replace(stopped.train, eval_every=2, log_every=2))
    summary = train(changed, resume=True, console=Console(force_terminal=False, width=200))
    assert summary["steps"] == 6
    out = capsys.readouterr().out
    assert "resume: train.eval_every: 0 -> 2" in out and "resume: train.log_every: 1 -> 2" in out
    assert f"resumed {stopped.train.out_dir} at step 3/6" in out


def test_resume_of_a_finished_run_returns_its_summary(base, shapes, tmp_path):
    cfg = recipe(base, shapes, tmp_path, max_steps=3, batch_size=4)
    first = train(cfg)
    rows = (tmp_path / "run/metrics.jsonl").read_text()
    again = train(cfg, resume=True)
    assert not math.isnan(again["loss"]) and again["loss"] == pytest.approx(first["loss"])
    assert json.loads((tmp_path / "run/summary.json").read_text())["loss"] == pytest.approx(first["loss"])
    assert (tmp_path / "run/metrics.jsonl").read_text() == rows


@pytest.mark.parametrize("name", ["trainer_state.pt", "model.safetensors"])
def test_a_truncated_checkpoint_file_is_named_with_what_to_do(stopped, name):
    path = Path(stopped.train.out_dir) / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # The whole path, and the reader's own error after it (its type too), so the cause is never lost.
    named = rf"^{re.escape(str(path))}: cannot be read \((?!NoneType)\w+: .+\); the file is truncated or corrupt"
    with pytest.raises(CheckpointError, match=named):
        train(stopped, resume=True)
    if name == "model.safetensors":
        with pytest.raises(CheckpointError, match=named):
            load_checkpoint(stopped.train.out_dir)


def test_export_and_import_refuse_a_non_empty_folder_and_leave_it_untouched(tiny_hf_llava, tmp_path):
    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    assert runner.invoke(app, ["import", str(tiny_hf_llava), "--out", str(ckpt)]).exit_code == 0
    before = digest(ckpt)
    onto_itself = runner.invoke(app, ["export", str(ckpt), "--out", str(ckpt)])
    assert isinstance(onto_itself.exception, FileExistsError) and str(ckpt) in str(onto_itself.exception)
    assert "--overwrite" in str(onto_itself.exception)
    again = runner.invoke(app, ["import", str(tiny_hf_llava), "--out", str(ckpt)])
    assert isinstance(again.exception, FileExistsError)
    assert digest(ckpt) == before
    load_checkpoint(ckpt)  # still a whole, loadable checkpoint

    done = runner.invoke(app, ["import", str(tiny_hf_llava), "--out", str(ckpt), "--overwrite"])
    assert done.exit_code == 0, done.output
    load_checkpoint(ckpt)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left behind


def test_a_failed_export_leaves_no_folder(tiny_hf_llava, tmp_path, monkeypatch):
    runner = CliRunner()
    assert runner.invoke(app, ["import", str(tiny_hf_llava), "--out", str(tmp_path / "ckpt")]).exit_code == 0

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr("mmalign.interop.hf_llava.export_hf_llava", broken)
    result = runner.invoke(app, ["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert isinstance(result.exception, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_command_line_prints_one_line_for_a_user_error_and_the_traceback_with_debug(base, shapes, tmp_path):
    cfg = recipe(base, shapes, tmp_path, max_steps=1)
    cfg.data.train = str(tmp_path / "missing.json")
    save_yaml(cfg, tmp_path / "r.yaml")
    command = [sys.executable, "-m", "mmalign.cli", "train", str(tmp_path / "r.yaml")]
    # Wide enough that the console does not wrap the sample's path (a worker's tmp path is long).
    env = os.environ | {"COLUMNS": "400"}
    plain = subprocess.run(command, capture_output=True, text=True, env=env)
    assert plain.returncode == 1
    assert "Traceback" not in plain.stdout + plain.stderr
    assert "missing.json" in plain.stdout and "--debug" in plain.stdout
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
