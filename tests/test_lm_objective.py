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


def test_bad_samples_are_named_logged_five_times_and_stop_the_run_past_the_limit(base, shapes, tmp_path):
    from mmalign.data.processor import SampleError
    from mmalign.train.loop import TooManyBadSamples

    obj = LMObjective(recipe(base, shapes, tmp_path / "new" / "folder", data={"max_skip_fraction": 0.1}))
    out = tmp_path / "new/folder/run"  # not there yet: the first bad sample makes it
    logged, state = [], {"seen": 0, "skipped": 0}

    def batch(k):  # 8 good samples and 2 bad ones
        bad = [{"id": f"b{k}{j}", "error": f"sample b{k}{j}: image file not found: x.png"} for j in range(2)]
        return {"ids": [f"g{k}{j}" for j in range(8)], "errors": bad}

    for k in range(4):  # 40 seen, 20% bad: under 50 seen, no verdict yet
        obj._account(batch(k), state, logged.append)
    assert logged == [f"[yellow]skipped[/] sample b{k}{j}: image file not found: x.png" for k in range(3)
                      for j in range(2)][:5]  # fmt: skip
    with pytest.raises(TooManyBadSamples) as err:  # the 50th sample seen: 10 of 50 > 10%
        obj._account(batch(4), state, logged.append)
    assert str(err.value) == f"10 of 50 samples were bad (> data.max_skip_fraction=0.1); see {out / 'skipped.jsonl'}"
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 10

    at_limit = {"seen": 45, "skipped": 3}  # 5 of 50 is exactly 10%: not past it
    obj._account({"ids": ["g"] * 3, "errors": [{"id": "c", "error": "sample c: no text"}] * 2}, at_limit, print)

    obj.cfg.data.on_error = "raise"
    with pytest.raises(SampleError) as err:
        obj._account(batch(5), {"seen": 0, "skipped": 0}, print)
    assert (err.value.sample_id, str(err.value)) == ("b50", "sample b50: image file not found: x.png")
    from mmalign.data.dataset import ConversationDataset

    turns = [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]
    bad = {"id": 7, "image": ["a.png", "b.png"], "conversations": turns}
    item = ConversationDataset.from_records([bad], None, obj.train_ds.processor, source="shards/00001.jsonl")[0]
    problem = "1 <image> placeholders in the text but 2 image items"
    assert item == {"id": 7, "error": f"shards/00001.jsonl: sample 7: {problem}"}
    with pytest.raises(SampleError) as err:  # raised, the sample is named once and its file after the problem
        obj._account({"ids": [], "errors": [item]}, {"seen": 0, "skipped": 0}, print)
    assert (err.value.sample_id, str(err.value)) == (7, f"sample 7: {problem} (in shards/00001.jsonl)")


def test_the_training_set_mixes_its_files_by_fraction_drawn_with_the_run_seed(base, shapes, tmp_path):
    from mmalign.data.processor import read_records

    files = [shapes["conversations"], shapes["captions"]]
    conversations, captions = read_records(files[0]), read_records(files[1])

    def records(seed):
        data = {"train": files, "train_fractions": [1.0, 0.25]}
        return LMObjective(recipe(base, shapes, tmp_path / str(seed), seed=seed, data=data)).train_ds.records

    first, second = records(3), records(4)
    assert len(first) == len(conversations) + len(captions) // 4
    assert first[: len(conversations)] == conversations and all(r in captions for r in first[len(conversations) :])
    assert first[len(conversations) :] != second[len(conversations) :]  # another seed draws another quarter
