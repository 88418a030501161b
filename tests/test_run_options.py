"""Run options around the step: activation checkpointing gives the same gradients while recomputing each block in
backward, and TensorBoard receives the same figures as metrics.jsonl."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from mmalign.config import ConfigError
from mmalign.data.dataset import Collator
from mmalign.models.layers import layer_stack
from mmalign.train.loop import LMObjective, train
from test_train import recipe


def gradients(base, shapes, tmp_path, checkpointing: bool) -> tuple[dict, int, list[str]]:
    """Gradients of one batch, how often the first LLM block's MLP ran, and the parameter names."""
    torch.manual_seed(0)
    trainable = ["connector", "llm", "encoder"]
    cfg = recipe(base, shapes, tmp_path, trainable=trainable, activation_checkpointing=checkpointing)
    obj = LMObjective(cfg).train()  # as the Trainer sets it: checkpointing is for training only
    calls = {"n": 0}
    layer_stack(obj.model.llm)[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    batch = Collator(obj.tokenizer.pad_token_id)([obj.train_ds[i] for i in range(4)])
    obj.losses(batch)["lm"].backward()
    grads = {n: p.grad.clone() for n, p in obj.model.named_parameters() if p.grad is not None}
    return grads, calls["n"], [n for n, _ in obj.model.named_parameters()]


def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients(base, shapes, tmp_path):
    plain, plain_calls, plain_names = gradients(base, shapes, tmp_path, checkpointing=False)
    recomputed, calls, names = gradients(base, shapes, tmp_path, checkpointing=True)
    assert (plain_calls, calls) == (1, 2)  # the block ran again in backward
    assert names == plain_names  # checkpoints, selectors and adapters see the same names
    assert plain.keys() == recomputed.keys() and any(".encoder" in n or "encoders." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_checkpointed_run_learns_like_a_plain_one(base, shapes, tmp_path):
    plain = train(recipe(base, shapes, tmp_path / "a", max_steps=4))
    checkpointed = train(recipe(base, shapes, tmp_path / "b", max_steps=4, activation_checkpointing=True))
    assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-4)


def test_tensorboard_holds_the_logged_figures(base, shapes, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(recipe(base, shapes, tmp_path, max_steps=5, tensorboard=True, data={"val": shapes["val"]}))
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run/tensorboard"))
    events.Reload()
    assert {"lm", "loss", "lr", "val_loss"} <= set(events.Tags()["scalars"])
    logged = [(r["step"], r["lm"]) for r in rows if "lm" in r]
    seen = [(e.step, e.value) for e in events.Scalars("lm")]
    assert [s for s, _ in seen] == [s for s, _ in logged] == [1, 2, 3, 4, 5]
    assert [v for _, v in seen] == pytest.approx([v for _, v in logged], rel=1e-6)


def test_tensorboard_without_the_package_says_how_to_install_it(base, shapes, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    message = "train.tensorboard=true needs the tensorboard package: pip install 'mmalign[tensorboard]'"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        train(recipe(base, shapes, tmp_path, max_steps=1, tensorboard=True))
