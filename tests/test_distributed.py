"""torchrun with two gloo processes on CPU: DDP steps give the parameters and losses of one process that sees the
same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from mmalign.config import save_yaml
from test_train import recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_ddp_processes_equal_one_process_with_the_global_batch(base, shapes, tmp_path):
    one = recipe(base, shapes, tmp_path / "one", max_steps=3, batch_size=8, grad_accum=1)
    two = recipe(base, shapes, tmp_path / "two", max_steps=3, batch_size=2, grad_accum=2)  # 2 ranks x 2 x 2 = 8
    for name, cfg in (("one", one), ("two", two)):
        save_yaml(cfg, tmp_path / f"{name}.yaml")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cli = ["-m", "mmalign.cli", "train"]
    subprocess.run([sys.executable, *cli, str(tmp_path / "one.yaml")], check=True, env=env, capture_output=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    done = subprocess.run([*launch, *cli, str(tmp_path / "two.yaml")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = load_file(tmp_path / "one/run/model.safetensors"), load_file(tmp_path / "two/run/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5)
    assert len(losses(tmp_path / "two/run")) == 3
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two/run")), torch.tensor(losses(tmp_path / "one/run")))
