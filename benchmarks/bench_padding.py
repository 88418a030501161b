"""Padded-token waste of random batches, length-grouped batches and sequence packing on LLaVA-like lengths.

Sample lengths are drawn procedurally (nothing is downloaded), in tokens the LLM sees:
  stage-1 captions:     576 image tokens + a short caption (8-60 text tokens, uniform)
  stage-2 instructions: 576 image tokens + a conversation of log-normal length (median 150, clipped to 16-2000),
                        10% of samples text-only (no image tokens)
  mixed:                half of each

Each row of a table is one way to form the epoch's batches; waste is the percent of token slots that are padding
(every batch right-padded to its longest row). Real tokens per batch say how much work a batch does, slots per batch
how much memory and compute it costs.
  random batches        the epoch's shuffled order (`epoch_order`) cut into batches of --batch-size samples
  length-grouped        `length_grouped_batches` (mega-batches of 32 batches), grouped by image / text-only
  packing               `pack_samples` over the whole epoch into packs of --pack-length tokens, batched
                        packs_per_batch at a time, where packs_per_batch = round(batch_size * mean length /
                        pack_length) (at least 1) so a batch holds about the tokens of batch_size samples
  packing, grouped      the same, packing the samples in the length-grouped order
  per-batch packing     what `PackedCollator` does inside one batch of --batch-size samples, so the number of rows
                        varies from batch to batch: on random batches and on length-grouped batches

    python benchmarks/bench_padding.py [--samples 20000] [--batch-size 16] [--pack-length 4096] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import statistics

from mmalign.data.dataset import epoch_order
from mmalign.data.grouping import length_grouped_batches, pack_samples, padding_waste

IMAGE_TOKENS = 576


def stage1_captions(n: int, rng: random.Random) -> tuple[list[int], list[str]]:
    """Caption pretraining: every sample an image and a short caption."""
    return [IMAGE_TOKENS + rng.randint(8, 60) for _ in range(n)], ["image"] * n


def stage2_instructions(n: int, rng: random.Random) -> tuple[list[int], list[str]]:
    """Instruction tuning: conversations of log-normal length (median 150, long tail), one in ten without an image."""
    lengths, groups = [], []
    for _ in range(n):
        text = min(max(round(rng.lognormvariate(5.01, 0.9)), 16), 2000)  # exp(5.01) ~ 150
        image = rng.random() >= 0.1
        lengths.append(text + IMAGE_TOKENS * image)
        groups.append("image" if image else "text")
    return lengths, groups


def datasets(n: int, seed: int) -> dict[str, tuple[list[int], list[str]]]:
    """The three data sets, each drawn from its own seeded stream so changing one leaves the others as they were."""
    captions = stage1_captions(n // 2, random.Random(seed + 2))
    instructions = stage2_instructions(n - n // 2, random.Random(seed + 3))
    return {
        "stage-1 captions": stage1_captions(n, random.Random(seed)),
        "stage-2 instructions": stage2_instructions(n, random.Random(seed + 1)),
        "mixed": (captions[0] + instructions[0], captions[1] + instructions[1]),
    }


def chunks(items: list, size: int) -> list[list]:
    return [items[b : b + size] for b in range(0, len(items), size)]


def pack_rows(packs: list[list[int]], lengths: list[int]) -> list[int]:
    """Tokens in each pack: a pack is one row of a batch."""
    return [sum(lengths[i] for i in pack) for pack in packs]


def packed_batches(order: list[int], lengths: list[int], pack_length: int, packs_per_batch: int):
    """Packing over the whole epoch: (batches of row indices, row lengths)."""
    rows = pack_rows(pack_samples(lengths, pack_length, order), lengths)
    return chunks(list(range(len(rows))), packs_per_batch), rows


def per_batch_packing(batches: list[list[int]], lengths: list[int], pack_length: int):
    """Packing inside each batch of samples, as a collator sees it: (batches of row indices, row lengths)."""
    rows, row_batches = [], []
    for batch in batches:
        mine = pack_rows(pack_samples(lengths, pack_length, batch), lengths)
        row_batches.append(list(range(len(rows), len(rows) + len(mine))))
        rows += mine
    return row_batches, rows


def describe(batches: list[list[int]], lengths: list[int]) -> tuple:
    """(batches, rows per batch, real tokens per batch, slots per batch, waste %) of batches of rows."""
    real = [sum(lengths[i] for i in b) for b in batches]
    slots = [len(b) * max(lengths[i] for i in b) for b in batches]
    rows = statistics.mean(len(b) for b in batches)
    return len(batches), rows, statistics.mean(real), statistics.mean(slots), padding_waste(batches, lengths)


def table(name: str, lengths: list[int], groups: list[str], args: argparse.Namespace) -> None:
    order = epoch_order(len(lengths), args.seed, epoch=0)
    random_batches = chunks(order, args.batch_size)
    grouped = length_grouped_batches(lengths, args.batch_size, args.seed, epoch=0, groups=groups)
    grouped_order = [i for b in grouped for i in b]
    packs_per_batch = max(1, round(args.batch_size * statistics.mean(lengths) / args.pack_length))
    rows = [
        ("random batches", describe(random_batches, lengths)),
        ("length-grouped batches", describe(grouped, lengths)),
        ("packing", describe(*packed_batches(order, lengths, args.pack_length, packs_per_batch))),
        (
            "packing, grouped order",
            describe(*packed_batches(grouped_order, lengths, args.pack_length, packs_per_batch)),
        ),
        ("per-batch packing, random", describe(*per_batch_packing(random_batches, lengths, args.pack_length))),
        ("per-batch packing, grouped", describe(*per_batch_packing(grouped, lengths, args.pack_length))),
    ]
    text_only = groups.count("text")
    print(
        f"\n{name}: {len(lengths)} samples ({text_only} text-only), length mean {statistics.mean(lengths):.0f}, "
        f"median {statistics.median(lengths):.0f}, max {max(lengths)}; packs_per_batch {packs_per_batch}"
    )
    print(f"{'method':<28} {'batches':>8} {'rows/batch':>10} {'real tok/batch':>15} {'slots/batch':>12} {'waste %':>8}")
    for label, (n, per, real, slots, waste) in rows:
        print(f"{label:<28} {n:>8} {per:>10.1f} {real:>15.0f} {slots:>12.0f} {waste:>8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20000, help="samples per data set")
    ap.add_argument("--batch-size", type=int, default=16, help="samples per batch (random and length-grouped)")
    ap.add_argument("--pack-length", type=int, default=4096, help="tokens per packed row")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, (lengths, groups) in datasets(args.samples, args.seed).items():
        table(name, lengths, groups, args)


if __name__ == "__main__":
    main()
