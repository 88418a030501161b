"""Length-grouped batches, packing, packed collation and the packed attention mask."""

from __future__ import annotations

import random

import pytest
import torch

from mmalign.constants import IGNORE_INDEX
from mmalign.data.dataset import epoch_order
from mmalign.data.grouping import (
    PackedCollator,
    length_grouped_batches,
    pack_samples,
    packed_attention_mask,
    packed_waste,
    padding_waste,
)

PAD = 0
IMAGE_TOKEN = 99


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Mostly short samples with a long tail, the shape that makes random batches pad a lot."""
    rng = random.Random(seed)
    return [min(int(rng.lognormvariate(4.5, 1.0)) + 1, 3000) for _ in range(n)]


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


# ---------------------------------------------------------------- length_grouped_batches


def test_batches_cover_every_index_once():
    lengths = skewed_lengths(1000)
    batches = length_grouped_batches(lengths, batch_size=16, seed=0, epoch=0, mega=4)
    assert sorted(flat(batches)) == list(range(1000))
    assert all(1 <= len(b) <= 16 for b in batches)
    assert sum(len(b) < 16 for b in batches) <= 1  # 1000 = 62 * 16 + 8: only one short batch


def test_batches_are_a_pure_function_of_seed_and_epoch():
    lengths = skewed_lengths(500)
    first = length_grouped_batches(lengths, 8, seed=3, epoch=1)
    assert length_grouped_batches(lengths, 8, seed=3, epoch=1) == first
    assert length_grouped_batches(lengths, 8, seed=3, epoch=2) != first
    assert length_grouped_batches(lengths, 8, seed=4, epoch=1) != first


def test_batches_do_not_visit_lengths_in_order():
    # one mega-batch holds all 640 samples, so unshuffled batches would come strictly longest first
    lengths = list(range(1, 641))
    batches = length_grouped_batches(lengths, 8, seed=0, epoch=0, mega=100)
    longest = [max(lengths[i] for i in b) for b in batches]
    assert sorted(longest) == list(range(8, 641, 8))  # still perfectly grouped: 8 consecutive lengths per batch
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_groups_never_mix_and_each_group_has_at_most_one_short_batch():
    rng = random.Random(1)
    keys = ["image", "audio", "image+audio", "text"]
    groups = [rng.choice(keys) for _ in range(777)]
    batches = length_grouped_batches(skewed_lengths(777), 10, seed=0, epoch=0, groups=groups, mega=3)
    assert sorted(flat(batches)) == list(range(777))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    for key in keys:
        mine = [b for b in batches if groups[b[0]] == key]
        assert sum(len(b) < 10 for b in mine) <= 1
    changes = sum(groups[a[0]] != groups[b[0]] for a, b in zip(batches, batches[1:], strict=False))
    assert changes > len(keys) * 3  # groups are interleaved, not visited one after another


def test_groups_must_match_samples():
    with pytest.raises(ValueError, match="one per sample"):
        length_grouped_batches([5, 6, 7], 2, 0, 0, groups=["image", "image"])


def test_grouped_waste_is_far_below_random_batching():
    lengths = skewed_lengths(4000)
    order = epoch_order(len(lengths), seed=0, epoch=0)
    random_batches = [order[b : b + 16] for b in range(0, len(order), 16)]
    grouped = length_grouped_batches(lengths, 16, seed=0, epoch=0)
    random_waste, grouped_waste = padding_waste(random_batches, lengths), padding_waste(grouped, lengths)
    assert random_waste > 50
    assert grouped_waste < random_waste / 2


def test_padding_waste_counts_pad_slots():
    # batch [0, 1]: 2 x 10 slots, 7 padding; batch [2]: no padding -> 7 of 24 slots
    assert padding_waste([[0, 1], [2]], [10, 3, 4]) == pytest.approx(100 * 7 / 24)
    assert padding_waste([[0], [1]], [10, 3]) == 0.0


# ---------------------------------------------------------------- pack_samples


def test_packs_fit_and_cover_every_index_once():
    lengths = skewed_lengths(2000)
    packs = pack_samples(lengths, max_len=3000)
    assert sorted(flat(packs)) == list(range(2000))
    assert all(sum(lengths[i] for i in p) <= 3000 for p in packs)
    # first-fit-decreasing leaves at most one pack half empty (two under half would have been merged)
    assert sum(sum(lengths[i] for i in p) <= 1500 for p in packs) <= 1


def test_pack_order_subset_and_within_pack_order():
    lengths = [5, 4, 3, 2, 1, 6]
    order = [5, 3, 1, 0]  # only these are packed; inside a pack they keep this order
    packs = pack_samples(lengths, max_len=10, order=order)
    assert sorted(flat(packs)) == [0, 1, 3, 5]
    for p in packs:
        assert p == sorted(p, key=order.index)
    assert pack_samples(lengths, 10, order) == packs  # deterministic


def test_first_fit_decreasing_packs_exactly():
    # decreasing: 6, 5, 4, 3, 2 -> [6, 4], [5, 3, 2] (first fit), fewer packs than any greedy in-order fill
    packs = pack_samples([2, 3, 4, 5, 6], max_len=10)
    assert packs == [[2, 4], [0, 1, 3]]


def test_too_long_sample_raises_with_its_index():
    with pytest.raises(ValueError, match=r"sample 2 has 11 tokens.*pack length 10"):
        pack_samples([3, 4, 11], max_len=10)


def test_packed_waste_pads_to_longest_pack_in_batch():
    lengths = [6, 4, 5, 3, 2]
    packs = [[0, 1], [2, 3], [4]]  # pack lengths 10, 8, 2
    # two packs per batch: [10, 8] -> 2 of 20 slots; [2] -> none
    assert packed_waste(packs, lengths, packs_per_batch=2) == pytest.approx(100 * 2 / 22)


# ---------------------------------------------------------------- PackedCollator


def sample(sid: str, n: int, images: int = 0) -> dict:
    """A dataset item of n tokens: `images` image placeholders up front, labels = token ids (easy to check)."""
    ids = [IMAGE_TOKEN] * images + [(7 * k + len(sid)) % 50 + 1 for k in range(n - images)]
    labels = [IGNORE_INDEX] * images + ids[images:]
    media = {"image": torch.full((1, 3), float(int(sid[1:])))} if images else {}
    return {"id": sid, "input_ids": ids, "labels": labels, "media": media}


def test_packed_collator_rows_positions_labels_and_seq_ids():
    items = [sample("s0", 6, images=1), sample("s1", 3), sample("s2", 4, images=1), sample("s3", 5)]
    batch = PackedCollator(pad_id=PAD, max_len=10)(items)
    # first-fit-decreasing on [6, 3, 4, 5]: row 0 = s0 + s2 (6 + 4), row 1 = s1 + s3 (3 + 5)
    assert batch["ids"] == ["s0", "s2", "s1", "s3"]
    assert batch["input_ids"].shape == (2, 10)
    row0 = items[0]["input_ids"] + items[2]["input_ids"]
    row1 = items[1]["input_ids"] + items[3]["input_ids"] + [PAD, PAD]
    assert batch["input_ids"].tolist() == [row0, row1]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4, 0, 0]]
    assert batch["seq_ids"].tolist() == [[1] * 6 + [2] * 4, [1] * 3 + [2] * 5 + [0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 10, [1] * 8 + [0, 0]]
    labels = batch["labels"]
    assert labels[1, 3] == IGNORE_INDEX and items[3]["labels"][0] != IGNORE_INDEX  # s3's first token not trained
    assert labels[1, 8:].tolist() == [IGNORE_INDEX] * 2
    assert labels[1, 4:8].tolist() == items[3]["labels"][1:]  # the rest of s3 is trained as the dataset said
    assert labels[0, 7:].tolist() == items[2]["labels"][1:]
    assert labels[0, 6] == IGNORE_INDEX


def placeholder_owners(batch: dict) -> list[str]:
    """The id of the sample each image placeholder belongs to, placeholders in row-major order."""
    owners, first = [], 0
    for row_ids, row_seq in zip(batch["input_ids"].tolist(), batch["seq_ids"].tolist(), strict=True):
        owners += [batch["ids"][first + s - 1] for t, s in zip(row_ids, row_seq, strict=True) if t == IMAGE_TOKEN]
        first += max(row_seq)
    return owners


def test_packed_collator_media_follow_row_major_sample_order():
    items = [sample("s0", 2), sample("s1", 6, images=1), sample("s2", 5, images=1), sample("s3", 4, images=1)]
    batch = PackedCollator(pad_id=PAD, max_len=10)(items)
    # FFD on [2, 6, 5, 4]: s1 (6) opens row 0, s2 (5) opens row 1, s3 (4) joins row 0, s0 (2) joins row 1
    assert batch["ids"] == ["s1", "s3", "s0", "s2"]
    assert batch["media"]["image"][:, 0].tolist() == [1.0, 3.0, 2.0]
    # the model fills placeholders in row-major order: the k-th placeholder must get the k-th media item
    owners = placeholder_owners(batch)
    assert owners == ["s1", "s3", "s2"]
    assert [float(sid[1:]) for sid in owners] == batch["media"]["image"][:, 0].tolist()


def test_packed_collator_keeps_errors_apart_and_turns_too_long_into_one():
    bad = {"id": "broken", "error": "sample broken: missing image"}
    items = [sample("s0", 4), bad, sample("s1", 12), sample("s2", 3)]
    batch = PackedCollator(pad_id=PAD, max_len=10)(items)
    assert batch["errors"] == [bad, {"id": "s1", "error": "sample s1: 12 tokens do not fit data.pack_length=10"}]
    assert batch["ids"] == ["s0", "s2"]
    assert batch["input_ids"].shape == (1, 7)
    assert batch["media"] == {}


def test_packed_collator_with_only_errors():
    batch = PackedCollator(pad_id=PAD, max_len=4)([{"id": "x", "error": "bad"}, sample("s1", 5)])
    assert batch["ids"] == [] and len(batch["errors"]) == 2 and "input_ids" not in batch


# ---------------------------------------------------------------- packed_attention_mask


def test_packed_attention_mask_is_causal_within_each_sample_only():
    seq_ids = torch.tensor([[1, 1, 1, 2, 2, 0]])
    mask = packed_attention_mask(seq_ids)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    m = mask[0, 0]
    assert m[2, 0] and m[2, 2] and m[4, 3] and m[3, 3]  # earlier or same token of the same sample
    assert not m[0, 1] and not m[3, 4]  # future keys
    assert not m[3, 2] and not m[4, 0]  # sample 2 never sees sample 1
    assert not m[5, :5].any() and not m[:5, 5].any()  # padding sees nothing real and nothing real sees it
    assert m[5, 5]  # a padding query sees itself, so no softmax row is empty
    assert m.any(dim=-1).all()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def test_packed_attention_mask_from_collator_rows():
    items = [sample("s0", 3), sample("s1", 2), sample("s2", 4)]
    batch = PackedCollator(pad_id=PAD, max_len=5)(items)
    mask = packed_attention_mask(batch["seq_ids"])
    assert mask.shape == (batch["input_ids"].shape[0], 1, 5, 5)
    same = batch["seq_ids"][:, :, None] == batch["seq_ids"][:, None, :]
    assert not (mask[:, 0] & ~same).any()  # never across samples
