"""Less padding per batch: length-grouped batch orders, sequence packing, and the waste measures that compare them.

A right-padded batch costs as many token slots as its longest sample times its size. Two ways to spend fewer:
group samples of similar length into the same batch (`length_grouped_batches`), or concatenate several samples into
one row of a fixed budget (`pack_samples`, `PackedCollator`), which then needs a mask that keeps samples apart
(`packed_attention_mask`). Everything here is a pure function of its arguments, so resume replays an epoch exactly.
"""

from __future__ import annotations

import torch

from mmalign.constants import IGNORE_INDEX
from mmalign.data.dataset import collate_media

# ---------------------------------------------------------------- length-grouped batches


def length_grouped_batches(
    lengths: list[int],
    batch_size: int,
    seed: int,
    epoch: int,
    groups: list[str] | None = None,
    mega: int = 32,
) -> list[list[int]]:
    """The epoch's batches as lists of sample indices, samples of similar length batched together.

    Indices are shuffled, split by group when `groups` is given (one key per sample, e.g. "image" or "image+audio",
    so no batch mixes groups and every batch has the same media layout), and each group's shuffled order is cut into
    mega-batches of `mega * batch_size` samples. A mega-batch is sorted longest first and cut into batches, so a
    batch holds neighbours in length while the mega-batch keeps the draw random at a coarser grain. The batches are
    shuffled at the end so training does not walk from long to short samples or from one group to the next.
    Every index appears exactly once; the last batch of each group may be short. Seeded like `epoch_order`.
    """
    if batch_size < 1 or mega < 1:
        raise ValueError(f"batch_size ({batch_size}) and mega ({mega}) must be at least 1")
    if groups is not None and len(groups) != len(lengths):
        raise ValueError(f"{len(groups)} group keys for {len(lengths)} samples: give one per sample")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    batches = []
    for members in split_by_group(order, groups):
        batches += grouped_within(members, lengths, batch_size, mega * batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def split_by_group(order: list[int], groups: list[str] | None) -> list[list[int]]:
    """`order` split by group key, each part keeping the shuffled order; parts in sorted key order, so the result
    does not depend on which group the shuffle happened to put first."""
    if groups is None:
        return [order]
    parts: dict[str, list[int]] = {}
    for i in order:
        parts.setdefault(groups[i], []).append(i)
    return [parts[key] for key in sorted(parts)]


def grouped_within(order: list[int], lengths: list[int], batch_size: int, mega_size: int) -> list[list[int]]:
    """Batches of one group: each mega-batch sorted longest first (stable: ties keep the shuffled order), then cut."""
    batches = []
    for start in range(0, len(order), mega_size):
        chunk = sorted(order[start : start + mega_size], key=lambda i: -lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return batches


# ---------------------------------------------------------------- packing


def pack_samples(lengths: list[int], max_len: int, order: list[int] | None = None) -> list[list[int]]:
    """First-fit-decreasing packing of samples into packs of at most `max_len` tokens, as lists of sample indices.

    Samples (those in `order`, else all) are placed longest first, each into the earliest pack it fits; equal
    lengths keep their place in `order`. Packs come out in the order they were opened (longest first member first),
    and inside a pack samples keep their order in `order`, so a collator that packs a batch keeps its item order
    within each row. Raises ValueError for a sample longer than `max_len`.
    """
    order = list(range(len(lengths))) if order is None else list(order)
    for i in order:
        if lengths[i] > max_len:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the pack length {max_len}")
    rank = {i: r for r, i in enumerate(order)}
    free = FreeSpace(len(order), max_len)
    packs: list[list[int]] = []
    for i in sorted(order, key=lambda i: -lengths[i]):
        slot = free.first_fit(lengths[i])
        if slot == len(packs):
            packs.append([])
        packs[slot].append(i)
    return [sorted(pack, key=rank.__getitem__) for pack in packs]


class FreeSpace:
    """Free tokens of `n` packs (all start empty) in a max-tree, so "the earliest pack with room for k tokens" costs
    O(log n) instead of a scan over every open pack: an epoch of samples packs in well under a second."""

    def __init__(self, n: int, capacity: int):
        self.size = 1
        while self.size < max(n, 1):
            self.size *= 2
        self.tree = [capacity] * (2 * self.size)  # leaf size + p: free tokens of pack p; inner node: max of children

    def first_fit(self, need: int) -> int:
        """Index of the earliest pack with at least `need` free tokens, which then loses them."""
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= need else 2 * node + 1
        self.tree[node] -= need
        slot, node = node - self.size, node // 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2
        return slot


# ---------------------------------------------------------------- waste


def padding_waste(batches: list[list[int]], lengths: list[int]) -> float:
    """Percent (0..100) of token slots that are padding when each batch is right-padded to its longest member."""
    slots = sum(len(batch) * max((lengths[i] for i in batch), default=0) for batch in batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 100.0 * (slots - real) / slots if slots else 0.0


def packed_waste(packs: list[list[int]], lengths: list[int], packs_per_batch: int) -> float:
    """Percent (0..100) of token slots that are padding when consecutive packs are batched `packs_per_batch` at a
    time and each batch is right-padded to its longest pack (the last batch may hold fewer packs).

    The pack length is not an argument: padding goes to the longest pack of each batch, not to the pack length.
    """
    if packs_per_batch < 1:
        raise ValueError(f"packs_per_batch must be at least 1, not {packs_per_batch}")
    pack_lengths = [sum(lengths[i] for i in pack) for pack in packs]
    rows = list(range(len(packs)))
    batches = [rows[b : b + packs_per_batch] for b in range(0, len(rows), packs_per_batch)]
    return padding_waste(batches, pack_lengths)


# ---------------------------------------------------------------- packed batches


class PackedCollator:
    """Packs a batch's samples into rows of at most `max_len` tokens, with what attention needs to keep them apart.

    Outputs, for R rows of T tokens (T = the longest row): `input_ids` right-padded with `pad_id`; `labels` with
    IGNORE_INDEX on padding and on every sample's first token, because the loss at a sample's first token would
    be predicted from the previous sample's last token; `attention_mask` 1 on real tokens; `position_ids` counting
    from 0 at each sample start, and 0 on padding, since a padding position is a one-token sequence of its own
    (it attends only to itself in `packed_attention_mask`); `seq_ids` the 1-based index of the sample within its
    row, 0 on padding; `media` per modality in row-major sample order (row 0's samples, then row 1's), the order in
    which the model fills placeholders; `ids` in the same order. Bad items come back in `errors` like `Collator`'s,
    and a sample longer than `max_len` joins them instead of raising.
    """

    def __init__(self, pad_id: int, max_len: int):
        self.pad_id = pad_id
        self.max_len = max_len

    def __call__(self, items: list[dict]) -> dict:
        errors, good = [], []
        for it in items:
            if "error" in it:
                errors.append(it)
            elif len(it["input_ids"]) > self.max_len:
                errors.append({"id": it["id"], "error": self.too_long(it)})
            else:
                good.append(it)
        rows = [[good[i] for i in pack] for pack in pack_samples([len(it["input_ids"]) for it in good], self.max_len)]
        batch: dict = {"errors": errors, "ids": [it["id"] for row in rows for it in row]}
        if not rows:
            return batch
        batch.update(self.fill(rows))
        batch["media"] = collate_media([it["media"] for row in rows for it in row])
        return batch

    def too_long(self, item: dict) -> str:
        return f"sample {item['id']}: {len(item['input_ids'])} tokens do not fit data.pack_length={self.max_len}"

    def fill(self, rows: list[list[dict]]) -> dict[str, torch.Tensor]:
        """The (R, T) tensors of packed rows."""
        shape = (len(rows), max(sum(len(it["input_ids"]) for it in row) for row in rows))
        out = {
            "input_ids": torch.full(shape, self.pad_id, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros(shape, dtype=torch.long),
            "position_ids": torch.zeros(shape, dtype=torch.long),
            "seq_ids": torch.zeros(shape, dtype=torch.long),
        }
        for r, row in enumerate(rows):
            start = 0
            for k, it in enumerate(row, start=1):
                n = len(it["input_ids"])
                span = slice(start, start + n)
                out["input_ids"][r, span] = torch.tensor(it["input_ids"])
                out["labels"][r, span] = torch.tensor(it["labels"])
                out["labels"][r, start] = IGNORE_INDEX
                out["attention_mask"][r, span] = 1
                out["position_ids"][r, span] = torch.arange(n)
                out["seq_ids"][r, span] = k
                start += n
        return out


def packed_attention_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (R, 1, T, T) mask from `seq_ids` (R, T): True where query t may attend key s, i.e. both belong to
    the same sample (same nonzero seq id) and s <= t.

    A padding query (seq id 0) attends to itself only: a query row with no allowed key would give a softmax over
    nothing (NaN), and letting it see itself keeps it finite while no real token ever sees padding.
    """
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # (R, T, T)
    real = (seq_ids != 0)[:, :, None]
    causal = torch.ones(seq_ids.shape[1], seq_ids.shape[1], dtype=torch.bool, device=seq_ids.device).tril()
    pad_self = torch.eye(seq_ids.shape[1], dtype=torch.bool, device=seq_ids.device) & ~real
    return ((same & real & causal) | pad_self)[:, None]
