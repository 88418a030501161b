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

    subprocess.run(launch("straight"), check=True, env=env, capture_output=True)
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
