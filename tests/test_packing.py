"""Packing and length grouping inside training: a packed batch gives the model the same loss as its samples one per
row, a packed run takes the same steps as an unpacked one, and grouped batches are shorter and never mix
modalities."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.config import ConfigError, check_recipe
from mmalign.data.dataset import Collator
from mmalign.data.grouping import PackedCollator, padding_waste
from mmalign.train.loop import LMObjective, model_inputs, train
from test_train import losses, recipe


@pytest.fixture(scope="module")
def objective(base, shapes, tmp_path_factory):
    torch.manual_seed(0)
    cfg = recipe(base, shapes, tmp_path_factory.mktemp("pack"), trainable=["connector", "llm"])
    return LMObjective(cfg)


def test_a_packed_batch_gives_the_loss_of_its_samples_one_per_row(objective):
    items = [objective.train_ds[i] for i in range(6)]
    longest = max(len(it["input_ids"]) for it in items)
    packed = PackedCollator(objective.tokenizer.pad_token_id, 2 * longest)(items)
    plain = Collator(objective.tokenizer.pad_token_id)(items)
    assert packed["input_ids"].shape[0] < len(items)  # several samples share a row
    model = objective.model.eval()
    with torch.no_grad():
        one_per_row = model(**model_inputs(plain))
        together = model(**model_inputs(packed))
    assert together["n_tokens"] == one_per_row["n_tokens"]
    torch.testing.assert_close(together["loss_sum"], one_per_row["loss_sum"], rtol=1e-4, atol=1e-4)


def test_packing_without_restarting_positions_would_change_the_loss(objective):
    """The check above can fail: the same rows read as one long sample each give another loss."""
    items = [objective.train_ds[i] for i in range(6)]
    packed = PackedCollator(objective.tokenizer.pad_token_id, 2 * max(len(it["input_ids"]) for it in items))(items)
    inputs = model_inputs(packed) | {"position_ids": None}
    with torch.no_grad():
        mixed = objective.model.eval()(**inputs)["loss_sum"]
        apart = objective.model(**model_inputs(packed))["loss_sum"]
    assert not torch.allclose(mixed, apart, rtol=1e-3)


def test_a_packed_run_takes_the_same_steps_as_an_unpacked_one(base, shapes, tmp_path):
    plain = recipe(base, shapes, tmp_path / "plain", max_steps=6)
    packed = recipe(base, shapes, tmp_path / "packed", max_steps=6, data={"pack_length": 1024})
    train(plain)
    train(packed)
    torch.testing.assert_close(losses(tmp_path / "packed/run"), losses(tmp_path / "plain/run"), rtol=2e-4, atol=2e-4)
    objective = LMObjective(packed)  # and it packs: four samples that fit in 1024 tokens share one row
    items = [objective.train_ds[i] for i in range(4)]
    assert sum(len(it["input_ids"]) for it in items) <= 1024
    assert objective.train_collate(items)["input_ids"].shape[0] == 1


def mixed_records(shapes, out) -> str:
    """The shapes conversations, every third one without its image: two modality groups of varied length."""
    records = json.loads(open(shapes["conversations"]).read())
    for i, rec in enumerate(records):
        if i % 3 == 0:
            del rec["image"]
            for turn in rec["conversations"]:
                turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
    path = out / "mixed.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_grouped_batches_cut_padding_and_never_mix_modalities(base, shapes, tmp_path):
    data = {"train": mixed_records(shapes, tmp_path), "group_by_length": True}
    obj = LMObjective(recipe(base, shapes, tmp_path, batch_size=4, data=data))
    lengths, groups = obj.train_ds.lengths()
    assert set(groups) == {"image", "text"}
    grouped = obj.epoch_batches(obj.train_ds, 0)
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))
    assert all(len({groups[i] for i in b}) == 1 for b in grouped)
    obj.cfg.data.group_by_length = False
    shuffled = obj.epoch_batches(obj.train_ds, 0)
    assert padding_waste(grouped, lengths) < padding_waste(shuffled, lengths)


def test_modality_grouping_keeps_batches_one_layout_and_the_draw_random(base, shapes, tmp_path):
    data = {"train": mixed_records(shapes, tmp_path), "group_by_modality": True}
    obj = LMObjective(recipe(base, shapes, tmp_path, batch_size=4, data=data))
    lengths, groups = obj.train_ds.lengths()
    batches = [obj.epoch_batches(obj.train_ds, epoch) for epoch in (0, 1)]
    for grouped in batches:
        assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))
        assert all(len({groups[i] for i in b}) == 1 for b in grouped)
        # Not sorted by length: within a batch the order is the shuffle's, so lengths are not descending.
        assert any(lengths[b[0]] < lengths[b[-1]] for b in grouped)
    assert batches[0] != batches[1]  # a fresh draw each epoch
    assert batches[0] == obj.epoch_batches(obj.train_ds, 0)  # and the same one on resume


def test_a_grouped_packed_run_learns(base, shapes, tmp_path):
    data = {"train": mixed_records(shapes, tmp_path), "group_by_length": True, "pack_length": 1024}
    summary = train(recipe(base, shapes, tmp_path, max_steps=15, batch_size=4, data=data))
    assert summary["skipped"] == 0
    first, last = losses(tmp_path / "run")[:3], losses(tmp_path / "run")[-3:]
    assert sum(last) < 0.8 * sum(first)


def test_pack_length_below_max_length_and_packing_flamingo_are_refused(base, shapes, tmp_path):
    with pytest.raises(ConfigError, match="pack_length=64 is below data.max_length=512"):
        check_recipe(recipe(base, shapes, tmp_path, data={"pack_length": 64}))
    cfg = recipe(base, shapes, tmp_path, data={"pack_length": 1024})
    cfg.model.family = "flamingo"
    with pytest.raises(ConfigError, match="cannot share a row"):
        check_recipe(cfg)
