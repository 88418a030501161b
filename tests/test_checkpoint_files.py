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
