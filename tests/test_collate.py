"""The collator, value by value: right padding, ignored labels and mask on the padding, media in sample order,
bad samples kept apart; and the seeded subsets a mix of training files draws."""

from __future__ import annotations

import torch

from mmalign.constants import IGNORE_INDEX
from mmalign.data.dataset import Collator, collate_media, subset, subset_size


def test_collator_right_pads_and_keeps_bad_samples_apart():
    bad = {"id": "b", "error": "b: image file not found"}
    items = [
        {"id": "a", "input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "media": {"image": torch.ones(1, 3)}},
        bad,
        {"id": 3, "input_ids": [8], "labels": [8], "media": {"image": torch.zeros(2, 3), "audio": torch.ones(1, 4)}},
    ]
    batch = Collator(pad_id=0)(items)
    assert batch["ids"] == ["a", 3] and batch["errors"] == [bad]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert {batch[k].dtype for k in ("input_ids", "labels", "attention_mask")} == {torch.long}
    assert batch["media"]["image"].tolist() == [[1.0] * 3, [0.0] * 3, [0.0] * 3]  # sample order, every item
    assert batch["media"]["audio"].shape == (1, 4)
    assert Collator(pad_id=0)([bad]) == {"errors": [bad], "ids": []}  # nothing to pad: no tensors at all


def test_collate_media_concatenates_per_modality():
    out = collate_media([{"image": torch.full((2, 1), 1.0)}, {}, {"image": torch.full((1, 1), 2.0)}])
    assert out["image"].flatten().tolist() == [1.0, 1.0, 2.0] and set(out) == {"image"}


def test_subsets_take_whole_passes_then_a_seeded_remainder():
    assert subset_size(10, 0.25) == 2 and subset_size(10, 1.5) == 15 and subset_size(10, 2.0) == 20
    half = subset(10, 0.5, seed=3)
    assert len(half) == 5 == len(set(half)) and half == sorted(half) and half == subset(10, 0.5, seed=3)
    assert half != subset(10, 0.5, seed=4)
    more = subset(4, 1.5, seed=0)
    assert more[:4] == [0, 1, 2, 3] and len(more) == 6 and set(more[4:]) <= {0, 1, 2, 3}
    assert subset(4, 1.0, seed=0) == [0, 1, 2, 3]
