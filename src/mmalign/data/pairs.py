"""Media-text pairs from any LLaVA-format file: what contrastive pretraining (LiT, CLIP, SigLIP) and data2vec read.

A record gives one pair: its first item of the modality and its first assistant reply (for caption data, the
caption). Records without that modality are passed over; unreadable ones are skipped with a count. A `partner`
modality also reads each record's first item of a second modality (binding audio to its paired image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmalign.data.processor import SampleError, parse_record, read_records
from mmalign.modalities.base import MediaError, get_modality


@dataclass
class Pairs:
    media: torch.Tensor  # (N, ...) preprocessed for one encoder
    texts: list[str]  # N captions ("" where a record has no assistant reply)
    ids: list[str]
    skipped: list[str]  # "id: problem" for every record that could not be read
    partners: list[torch.Tensor | None] | None = None  # each pair's item of the partner modality (None: it has none)


def read_pairs(paths, folder: str | Path, encoder, modality: str = "image", partner: tuple | None = None) -> Pairs:
    """Every record of `paths` (files of LLaVA records) with an item of `modality`, preprocessed for `encoder`.
    `partner` = (modality, encoder) also reads each record's first item of that modality, where it has one."""
    mod = get_modality(modality)
    folder = Path(folder)
    media, texts, ids, skipped, partners = [], [], [], [], []
    for path in [paths] if isinstance(paths, str | Path) else paths:
        for index, record in enumerate(read_records(path)):
            try:
                conv = parse_record(record, index)
                items = conv.media.get(modality) or []
                if not items or conv.is_document:
                    continue  # pairs come from caption-like records; documents hold several media each
                item = _read(mod, items[0], folder, encoder)
                other = None
                if partner is not None and conv.media.get(partner[0]):
                    other = _read(get_modality(partner[0]), conv.media[partner[0]][0], folder, partner[1])
            except (SampleError, MediaError) as err:
                skipped.append(f"{record.get('id', f'#{index}') if isinstance(record, dict) else f'#{index}'}: {err}")
                continue
            media.append(item)
            partners.append(other)
            replies = [m["content"] for m in conv.messages if m["role"] == "assistant"]
            texts.append(replies[0].strip() if replies else "")
            ids.append(str(conv.id))
    if not media:
        raise ValueError(f"no {modality} items found in {paths} (skipped {len(skipped)}: {skipped[:3]})")
    return Pairs(torch.stack(media), texts, ids, skipped, partners if partner is not None else None)


def _read(mod, item, folder: Path, encoder) -> torch.Tensor:
    return mod.preprocess(mod.load(folder / item if isinstance(item, str) else item), encoder)


def split_off(pairs: Pairs, seed: int, n: int | None = None) -> tuple[Pairs, Pairs]:
    """(train, held-out): `n` random pairs held out (default 5%, at least 1, at most 256), the rest for training."""
    n = max(1, min(256, len(pairs.ids) // 20)) if n is None else n
    order = torch.randperm(len(pairs.ids), generator=torch.Generator().manual_seed(seed)).tolist()
    held, kept = sorted(order[:n]), sorted(order[n:])

    def take(rows: list[int]) -> Pairs:
        partners = None if pairs.partners is None else [pairs.partners[i] for i in rows]
        return Pairs(pairs.media[rows], [pairs.texts[i] for i in rows], [pairs.ids[i] for i in rows], [], partners)

    return take(kept), take(held)
