"""The step stamped into a weights file, and a corrupt one named with its reader's error."""

import re

import pytest
import torch
from safetensors.torch import save_file

from mmalign.errors import CheckpointError
from mmalign.train.checkpoint import WEIGHTS, weights_step


def test_weights_step_reads_the_stamp_and_names_a_corrupt_file(tmp_path):
    path = tmp_path / WEIGHTS
    save_file({"w": torch.zeros(64)}, path, metadata={"format": "pt", "step": "12"})
    assert weights_step(tmp_path) == 12
    save_file({"w": torch.zeros(64)}, path, metadata={"format": "pt"})
    assert weights_step(tmp_path) is None
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot be read \(SafetensorError: .+\); "):
        weights_step(tmp_path)


def test_load_checkpoint_puts_the_model_on_the_device_asked_for_in_eval_mode(shapes, tmp_path):
    from helpers import tiny_model_config
    from mmalign.models.builder import build_model
    from mmalign.train.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_model_config(shapes["tokenizer"])
    model, tok = build_model(cfg)
    save_checkpoint(tmp_path / "ckpt", model.train(), tok, cfg)
    for device in ("cpu", "meta"):  # meta stands in for a GPU
        loaded, _, _ = load_checkpoint(tmp_path / "ckpt", device=device)
        assert {p.device.type for p in loaded.parameters()} == {device}
        assert not any(m.training for m in loaded.modules())
