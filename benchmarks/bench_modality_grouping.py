"""Mixed-modality batches against batches of one modality, for the onellm family's instruction stage: training
samples/s (forward + backward) of the shipped curriculum's model over the embedded data of every modality.

A mixed batch runs each modality's tokenizer and the universal encoder once per modality in it, each call on a few
items; a grouped batch (`data.group_by_modality=true`) runs them once. Both modes time the same number of batches
of the same size from the epoch's own batch order (`epoch_batches`), collated before timing so only the model's
step is measured; the table also gives the modalities per batch and the padded token slots per batch.

Needs the quickstart's stage 0 (`mmalign quickstart --family onellm` writes runs/quickstart_onellm/base and
data/multimodal).

    python benchmarks/bench_modality_grouping.py [--batches 12] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mmalign.quickstart_onellm import CURRICULUM, curriculum_recipe
from mmalign.train.loop import LMObjective, model_inputs


def step_seconds(obj: LMObjective, batches: list[dict]) -> list[float]:
    times = []
    for batch in batches:
        start = time.perf_counter()
        obj.model(**model_inputs(batch))["loss_sum"].backward()
        times.append(time.perf_counter() - start)
        obj.model.zero_grad(set_to_none=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/quickstart_onellm/base"), help="stage-0 folder")
    ap.add_argument("--data", type=Path, default=Path("data/multimodal"), help="the embedded multimodal data")
    ap.add_argument("--batches", type=int, default=12, help="timed batches per mode (after 2 warm-up batches)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.base / "lm").is_dir():
        raise SystemExit(f"{args.base} has no stage 0: run `mmalign quickstart --family onellm` first")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = {k: args.base / k for k in ("encoder", "lm", "tokenizers")}
    cfg = curriculum_recipe(CURRICULUM, args.data, base, Path("/tmp/bench_grouping"), 0, False)
    instruct = cfg.stages[-1]
    cfg.data.train, cfg.train.trainable, cfg.train.batch_size = instruct.data, instruct.trainable, args.batch_size
    obj = LMObjective(cfg)
    ds = obj.train_ds
    _, groups = ds.lengths()
    print(f"{len(ds)} instruction samples over {len(set(groups))} modalities, batches of {args.batch_size}")
    print(f"{'batches':<10} {'samples/s':>10} {'modalities/batch':>17} {'slots/batch':>12}")
    for mode in ("mixed", "grouped"):
        obj.cfg.data.group_by_modality = mode == "grouped"
        order = obj.epoch_batches(ds, 0)[: args.batches + 2]
        batches = [obj.collate([ds[i] for i in b]) for b in order]
        step_seconds(obj, batches[:2])  # warm-up
        times = step_seconds(obj, batches[2:])
        per_batch = statistics.mean(len({groups[i] for i in b}) for b in order[2:])
        slots = statistics.mean(b["input_ids"].numel() for b in batches[2:])
        print(f"{mode:<10} {args.batch_size / statistics.median(times):>10.1f} {per_batch:>17.1f} {slots:>12.0f}")


if __name__ == "__main__":
    main()
