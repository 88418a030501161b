"""torchrun with two gloo processes on CPU: DDP and FSDP2 steps give the parameters and losses of one process that
sees the same global batch."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import save_yaml
from test_kill_resume import _saved_step
from test_train import recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(command, env, tries: int = 2):
    """Run a torchrun command (a function giving it, with a fresh port each call) to the end. A port taken between
    free_port() and the launch gets one retry; a failure shows the launcher's stderr, which capture_output hides."""
    for _ in range(tries):
        done = subprocess.run(command(), env=env, capture_output=True, text=True)
        if done.returncode == 0 or "address already in use" not in done.stderr.lower():
            break
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_global_batch(base, shapes, tmp_path, engine):
    one = recipe(base, shapes, tmp_path / "one", max_steps=3, batch_size=8, grad_accum=1)
    # 2 ranks x 2 samples x 2 micro-batches = 8
    two = recipe(base, shapes, tmp_path / "two", max_steps=3, batch_size=2, grad_accum=2, distributed=engine)
    for name, cfg in (("one", one), ("two", two)):
        save_yaml(cfg, tmp_path / f"{name}.yaml")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cli = ["-m", "mmalign.cli", "train"]
    subprocess.run([sys.executable, *cli, str(tmp_path / "one.yaml")], check=True, env=env, capture_output=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    done = subprocess.run([*launch, *cli, str(tmp_path / "two.yaml")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    if engine == "fsdp":  # each rank held about half the model, and together all of it
        held = re.findall(r"FSDP2: .* holds ([\d,]+) of ([\d,]+)", done.stdout)
        assert len(held) == 2, done.stdout[-3000:]
        (a, total), (b, _) = ((int(x.replace(",", "")) for x in pair) for pair in held)
        assert a + b == total and max(a, b) < 0.6 * total

    a, b = load_file(tmp_path / "one/run/model.safetensors"), load_file(tmp_path / "two/run/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5)
    assert len(losses(tmp_path / "two/run")) == 3
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two/run")), torch.tensor(losses(tmp_path / "one/run")))


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def test_an_fsdp_run_killed_after_its_second_save_resumes_with_the_same_losses(base, shapes, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    runs = {}
    for name in ("straight", "killed"):
        cfg = recipe(base, shapes, tmp_path / name, max_steps=12, save_every=2, batch_size=2, distributed="fsdp")
        save_yaml(cfg, tmp_path / f"{name}.yaml")
        runs[name] = tmp_path / name / "run"

    def launch(name, *extra):
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        return [*run, "-m", "mmalign.cli", "train", str(tmp_path / f"{name}.yaml"), *extra]

    run_launcher(lambda: launch("straight"), env)
    proc = subprocess.Popen(launch("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _saved_step(runs["killed"]) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in children(proc.pid) + [proc.pid]:  # both ranks (torchrun starts them in sessions of their own), then it
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert 4 <= _saved_step(runs["killed"]) < 12
    assert len(losses(runs["killed"])) < 12

    done = subprocess.run(launch("killed", "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(runs["killed"]) == losses(runs["straight"])
    a, b = load_file(runs["straight"] / "model.safetensors"), load_file(runs["killed"] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad"])
def test_classifier_under_ddp_equals_one_process_with_the_global_batch(tmp_path, weighting):
    from mmalign.config import resolve_recipe
    from mmalign.fusion.config import load_classifier_recipe
    from mmalign.fusion.data import write_fusion_dataset

    data = write_fusion_dataset(tmp_path / "data", n_train=48, n_test=8, seed=0, progress=False)
    small = ["model.encoders.image.config.hidden_size=16", "model.encoders.image.config.intermediate_size=32",
             "model.encoders.audio.config.dim=16", "model.fusion.dim=16", "model.tasks={}",
             "model.modality_dropout=0.3", f"multitask.weighting={weighting}", f"data.train={data['train']}",
             "data.val=null", "train.progress=false", "train.max_steps=3", "train.log_every=1",
             "train.grad_accum=2"]  # fmt: skip
    # 1 process x 4 samples vs 2 processes x 2 samples: the same global micro-batches, dropout included.
    for name, batch in (("one", 4), ("two", 2)):
        run = [f"train.batch_size={batch}", f"train.out_dir={tmp_path / name}"]
        cfg = load_classifier_recipe(resolve_recipe("classify_av"), [*small, *run])
        save_yaml(cfg, tmp_path / f"{name}.yaml")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cli = ["-m", "mmalign.cli", "classify", "train"]
    subprocess.run([sys.executable, *cli, str(tmp_path / "one.yaml")], check=True, env=env, capture_output=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    done = subprocess.run([*launch, *cli, str(tmp_path / "two.yaml")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 reports

    a, b = load_file(tmp_path / "one/objective.safetensors"), load_file(tmp_path / "two/objective.safetensors")
    assert a.keys() == b.keys()
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")]  # fmt: skip
    logged = [[{k: v for k, v in r.items() if k.startswith(("colour", "pitch", "mix", "weight_"))} for r in run]
              for run in rows]  # fmt: skip
    assert len([r for r in logged[1] if r]) == 3
    if weighting == "pcgrad":  # projects each rank's own gradients, so it matches one process only in kind
        assert b["weighting.calls"].item() == 3 * 2  # every micro-batch of every step went through it
        assert all("pcgrad_conflicts" in r for r in rows[1] if "colour" in r)
        return
    for k in a:  # Adam's first steps amplify float noise in near-zero gradients; a step moves weights by ~lr=2e-3
        torch.testing.assert_close(b[k], a[k], atol=5e-5, rtol=1e-4, msg=k)
    for x, y in zip(*logged, strict=True):
        assert x.keys() == y.keys()
        torch.testing.assert_close(torch.tensor(list(y.values())), torch.tensor(list(x.values())))
