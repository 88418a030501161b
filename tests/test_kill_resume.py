"""A run killed at any instant (SIGKILL, power loss) resumes from its last complete save and continues exactly as
if it had never stopped: same losses step for step, same final weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import save_yaml
from mmalign.data.stream import write_shards
from mmalign.train import trainer as trainer_module
from mmalign.train.loop import recipe_trainer, train
from test_train import recipe


class Killed(BaseException):
    """Stands in for SIGKILL inside the test process: not an Exception, so no crash-save handler runs."""


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_weights(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("moves_before_kill", [0, 1, 3])
def test_a_save_killed_after_its_commit_point_is_finished_on_resume(base, shapes, tmp_path, monkeypatch,
                                                                    moves_before_kill):  # fmt: skip
    straight = recipe(base, shapes, tmp_path / "a", max_steps=6, save_every=2, batch_size=4)
    train(straight)
    killed = recipe(base, shapes, tmp_path / "b", max_steps=6, save_every=2, batch_size=4)
    real_replace, moves = os.replace, {"n": 0, "armed": False}

    def replace(src, dst):
        if str(dst).endswith(trainer_module.COMPLETE) and open(src).read() == "4":
            moves["armed"] = True  # the save of step 4 reached its commit point
        elif moves["armed"]:
            if moves["n"] == moves_before_kill:
                raise Killed
            moves["n"] += 1
        real_replace(src, dst)

    monkeypatch.setattr(trainer_module.os, "replace", replace)
    with pytest.raises(Killed):
        train(killed)
    monkeypatch.setattr(trainer_module.os, "replace", real_replace)
    assert (tmp_path / "b/run/.saving/COMPLETE").is_file()
    summary = train(killed, resume=True)
    assert summary["steps"] == 6
    assert losses(tmp_path / "b/run") == losses(tmp_path / "a/run")
    assert_same_weights(tmp_path / "a/run", tmp_path / "b/run")


def test_a_save_killed_before_its_commit_point_resumes_from_the_previous_one(base, shapes, tmp_path, monkeypatch):
    straight = recipe(base, shapes, tmp_path / "a", max_steps=6, save_every=2, batch_size=4)
    train(straight)
    killed = recipe(base, shapes, tmp_path / "b", max_steps=6, save_every=2, batch_size=4)
    real_save = trainer_module.torch.save

    def save(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("state", {}).get("step") == 4:
            raise Killed  # weights of step 4 are staged, its trainer state is not
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(trainer_module.torch, "save", save)
    with pytest.raises(Killed):
        train(killed)
    monkeypatch.setattr(trainer_module.torch, "save", real_save)
    assert (tmp_path / "b/run/.saving").is_dir() and not (tmp_path / "b/run/.saving/COMPLETE").exists()
    trainer = recipe_trainer(killed, resume=True)
    assert trainer.state["step"] == 2 and not (tmp_path / "b/run/.saving").exists()
    trainer.fit()
    assert losses(tmp_path / "b/run") == losses(tmp_path / "a/run")
    assert_same_weights(tmp_path / "a/run", tmp_path / "b/run")


def _cli(recipe_path, *extra):
    code = "from mmalign.cli import app; app()"
    return [sys.executable, "-c", code, "train", str(recipe_path), *extra]


def _saved_step(run_dir) -> int:
    try:
        return torch.load(run_dir / "trainer_state.pt", weights_only=True)["state"]["step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


@pytest.mark.parametrize(
    "data", [{}, {"group_by_length": True, "pack_length": 1024}, {"stream": True}], ids=["plain", "packed", "stream"]
)
def test_sigkill_after_the_second_checkpoint_resumes_with_the_same_losses(base, shapes, tmp_path, data):
    if data.get("stream"):  # tar shards of 7 records: a kill lands inside a shard, and epochs cross several
        records = json.loads(open(shapes["conversations"]).read())
        write_shards(records, tmp_path / "shards", 7, fmt="tar", media_folder=Path(shapes["images"]))
        data = data | {"train": str(tmp_path / "shards")}
    runs = {}
    for name in ("straight", "killed"):
        cfg = recipe(base, shapes, tmp_path / name, max_steps=40, save_every=3, batch_size=4, data=data)
        save_yaml(cfg, tmp_path / f"{name}.yaml")
        runs[name] = tmp_path / name / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the same thread count in every process: bitwise-equal losses
    subprocess.run(_cli(tmp_path / "straight.yaml"), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_cli(tmp_path / "killed.yaml"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _saved_step(runs["killed"]) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    stopped = _saved_step(runs["killed"])
    assert 6 <= stopped < 40

    done = subprocess.run(_cli(tmp_path / "killed.yaml", "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed" in done.stdout
    assert losses(runs["killed"]) == losses(runs["straight"])
    assert_same_weights(runs["straight"], runs["killed"])


def test_killed_at_random_instants_again_and_again_a_run_ends_as_if_never_stopped(base, shapes, tmp_path):
    """SIGKILL four times at random instants (in a step or inside a save: every step saves), resume each time."""
    rng = random.Random(0)
    runs = {}
    for name in ("straight", "killed"):
        cfg = recipe(base, shapes, tmp_path / name, max_steps=30, save_every=1, batch_size=4)
        save_yaml(cfg, tmp_path / f"{name}.yaml")
        runs[name] = tmp_path / name / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(tmp_path / "straight.yaml"), check=True, env=env, capture_output=True)

    kills, extra = 0, ()
    for _ in range(4):
        before = _saved_step(runs["killed"])
        proc = subprocess.Popen(_cli(tmp_path / "killed.yaml", *extra), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 120
        while _saved_step(runs["killed"]) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))  # a random instant after some progress
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills, extra = kills + 1, ("--resume",)
    assert kills >= 2

    done = subprocess.run(_cli(tmp_path / "killed.yaml", "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(runs["killed"]) == losses(runs["straight"])
    assert_same_weights(runs["straight"], runs["killed"])
