"""Dataset, collator and a resumable batch order. Bad samples come back as error markers, never as exceptions,
so the training loop decides (skip and count, or save and stop) and a DataLoader worker never dies mid-epoch."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmalign.constants import IGNORE_INDEX
from mmalign.data.processor import Processor, SampleError, parse_record, read_records


class ConversationDataset(Dataset):
    """LLaVA conversations and interleaved documents from one file or several mixed (records in file order)."""

    def __init__(
        self,
        path: str | Path | list[str | Path],
        media_folder: str | Path,
        processor: Processor,
        fractions: list[float] | None = None,
        seed: int = 0,
    ):
        paths = path if isinstance(path, list) else [path]
        fractions = fractions or [1.0] * len(paths)
        if len(fractions) != len(paths):
            raise ValueError(f"{len(fractions)} data fractions for {len(paths)} training files: give one per file")
        self.records, self.sources = [], []  # sources: (file, index in it), so errors point into the right file
        for n, (p, fraction) in enumerate(zip(paths, fractions, strict=True)):
            records = read_records(p)
            keep = subset(len(records), fraction, seed * 1_000_003 + n)
            self.records += [records[i] for i in keep]
            self.sources += [(str(p) if len(paths) > 1 else None, i) for i in keep]
        self.media_folder = Path(media_folder)
        self.processor = processor
        self._lengths: tuple[list[int], list[str]] | None = None

    @classmethod
    def from_records(cls, records: list[dict], media_folder, processor: Processor, source: str | None = None):
        """A dataset over records already read (one shard of a stream); errors name `source` and the index."""
        ds = cls([], media_folder or "", processor)
        ds.records, ds.sources = list(records), [(source, i) for i in range(len(records))]
        return ds

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record, (source, local) = self.records[index], self.sources[index]
        try:
            conv = parse_record(record, local)
            input_ids, labels = self.processor.tokenize(conv)
            media = self.processor.media(conv, self.media_folder)
        except SampleError as err:
            return {"id": err.sample_id, "error": f"{source}: {err}" if source else str(err)}
        return {"id": conv.id, "input_ids": input_ids, "labels": labels, "media": media}

    def lengths(self) -> tuple[list[int], list[str]]:
        """Each sample's token count (media tokens included) and the modalities it carries ("image", "audio+image",
        "text"), from the text alone, no media read. A sample that fails counts 0 in group "bad"; it fails again,
        with its message, when it is read for training."""
        if self._lengths is None:
            lengths, groups = [], []
            for record, (_, local) in zip(self.records, self.sources, strict=True):
                try:
                    conv = parse_record(record, local)
                    lengths.append(len(self.processor.tokenize(conv)[0]))
                    groups.append("+".join(sorted(conv.media)) or "text")
                except SampleError:
                    lengths.append(0)
                    groups.append("bad")
            self._lengths = (lengths, groups)
        return self._lengths


def subset_size(n: int, fraction: float) -> int:
    """How many records `subset` takes: whole passes for the integer part, then the rounded remainder."""
    whole, part = divmod(fraction, 1.0)
    return int(whole) * n + round(part * n)


def subset(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of a seeded `fraction` of n records: whole copies for the integer part, then a random subset
    (replay of an earlier stage's data may take less or more than one pass over it)."""
    whole = int(fraction)
    extra = sorted(random.Random(seed).sample(range(n), subset_size(n, fraction) - whole * n))
    return list(range(n)) * whole + extra


def collate_media(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per modality, every item of every sample concatenated in sample order: {modality: (items, ...)}."""
    out: dict[str, list[torch.Tensor]] = {}
    for media in items:
        for modality, tensor in media.items():
            out.setdefault(modality, []).append(tensor)
    return {m: torch.cat(ts) for m, ts in out.items()}


class Collator:
    """Right-pads a batch; media of all samples are concatenated per modality in sample order."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        errors = [it for it in items if "error" in it]
        good = [it for it in items if "error" not in it]
        batch: dict = {"errors": errors, "ids": [it["id"] for it in good]}
        if not good:
            return batch
        length = max(len(it["input_ids"]) for it in good)
        ids = torch.full((len(good), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(good), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(good), length), dtype=torch.long)
        for row, it in enumerate(good):
            n = len(it["input_ids"])
            ids[row, :n] = torch.tensor(it["input_ids"])
            labels[row, :n] = torch.tensor(it["labels"])
            mask[row, :n] = 1
        batch.update(
            input_ids=ids, labels=labels, attention_mask=mask, media=collate_media([it["media"] for it in good])
        )
        return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled sample order of one epoch: a pure function of (seed, epoch), so resume replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
