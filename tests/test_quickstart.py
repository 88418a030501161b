"""The quickstart pipeline end to end, shrunk: the model must beat the blind baseline and the majority answer on
held-out images (the full-size figures are in the README, from `mmalign quickstart`)."""

from __future__ import annotations

import json

from mmalign.quickstart import run_quickstart


def test_quickstart_learns_to_see(tmp_path):
    result = run_quickstart(
        tmp_path / "run",
        tmp_path / "data",
        n_train=600,
        vision_steps=150,
        lm_steps=80,
        stage1_epochs=1,
        stage2_epochs=3,
        progress=False,
    )
    assert result["accuracy"] > result["blind_accuracy"] + 0.2
    assert result["accuracy"] > result["majority_accuracy"] + 0.15
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["accuracy"] == result["accuracy"]
    assert (tmp_path / "run" / "stage2" / "model.safetensors").is_file()
