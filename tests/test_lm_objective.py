"""The LM objective's own figures: the token count a step divides by, the validation loss, the description a run
prints, and media blanking drawn from the batch's seed."""

from __future__ import annotations

import re

import pytest
import torch

from mmalign.constants import IGNORE_INDEX
from mmalign.data.dataset import Collator
from mmalign.train.freeze import count_parameters
from mmalign.train.loop import LMObjective, model_inputs
from test_train import recipe


def test_counts_are_the_targets_the_loss_sums_over(base, shapes, tmp_path):
    obj = LMObjective(recipe(base, shapes, tmp_path))
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [7, IGNORE_INDEX, 8, 9]])
    assert obj.counts({"labels": labels}) == {"lm": 4}  # the first position is nobody's target: 5, 6, 8 and 9
    batch = Collator(obj.tokenizer.pad_token_id)([obj.train_ds[i] for i in range(4)])
    with torch.no_grad():
        out = obj.model(**model_inputs(batch))
    assert obj.counts(batch) == {"lm": int(out["n_tokens"])}


def test_validation_loss_is_the_loss_over_every_trained_token_of_the_set(base, shapes, tmp_path):
    obj = LMObjective(recipe(base, shapes, tmp_path, data={"val": shapes["val"]}))
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in obj.val_loader:
            out = obj.model(**model_inputs(batch))
            total, count = total + float(out["loss_sum"]), count + int(out["n_tokens"])
        assert count > 1
        assert obj.evaluate() == {"val_loss": pytest.approx(total / count, rel=1e-6)}  # as the Trainer calls it
    assert LMObjective(recipe(base, shapes, tmp_path / "b")).evaluate() == {}  # no validation set


def test_describe_names_each_group_and_the_adapters(base, shapes, tmp_path):
    obj = LMObjective(recipe(base, shapes, tmp_path))
    lines = obj.describe().split("\n")
    assert len(lines) == 1
    parts = lines[0].split(", ")
    assert [p.split()[0] for p in parts] == list(count_parameters(obj.model))  # every group, in one line
    assert all(re.fullmatch(r"[\w.]+ [\d,]+/[\d,]+ trainable", p) for p in parts), parts

    lora = LMObjective(recipe(base, shapes, tmp_path / "lora", finetune="lora"))
    first, adapters = lora.describe().split("\n")
    assert first.split(", ")[0] == parts[0]
    match = re.fullmatch(r"lora adapters on (\d+) modules: (.+)", adapters)
    assert match and int(match[1]) == len(lora.model_cfg.lora.modules) > 1
    patterns = match[2].split(", ")
    assert len(patterns) > 1 and all(re.fullmatch(r"llm\.[\w.{}-]+\.\w+_proj", p) for p in patterns), patterns


def test_blank_media_zeroes_some_items_the_same_way_each_run(base, shapes, tmp_path):
    def first_batches(out):
        obj = LMObjective(recipe(base, shapes, out, data={"blank_media_prob": 0.5}))
        state = {"epoch": 0, "cursor": 0, "seen": 0, "skipped": 0}
        stream = obj.batches(state, obj.cfg.train, print)
        return [next(stream)["media"]["image"] for _ in range(3)]

    torch.manual_seed(1)
    first = first_batches(tmp_path / "a")
    torch.manual_seed(2)  # the global generator plays no part: each batch draws from its own seed
    again = first_batches(tmp_path / "b")
    for x, y in zip(first, again, strict=True):
        torch.testing.assert_close(x, y)
    blank = torch.cat([x.flatten(1).eq(0).all(1) for x in first])
    assert 0 < int(blank.sum()) < len(blank)  # some of the 24 items, not all
