"""Data-path throughput per modality: samples/s through load + preprocess + collate, from real files written by each
modality's generator, so the slowest modality's loader is known before it slows a mixed batch.

Each modality's files are written once to a temporary folder (the embedded data's own generator and file format:
PNG, GIF, WAV, PLY, 16-bit PNG, CSV, NPY), then read back `--reps` times in a single process with the preprocessing
settings of that modality's onellm tokenizer at its defaults.

    python benchmarks/bench_modality_data.py [--items 256] [--batch 32] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmalign.data.dataset import collate_media
from mmalign.data.multimodal import synthetic_modalities
from mmalign.modalities import get_modality
from mmalign.models.encoders import clip_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=256, help="files per modality")
    ap.add_argument("--batch", type=int, default=32, help="samples per collated batch")
    ap.add_argument("--reps", type=int, default=3, help="timed passes; the median is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker uses one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    universal = clip_encoder(preset="tiny-vit")  # image, video and depth tokenizers take the tower's sizes
    print(f"{'modality':<8} {'format':<6} {'samples/s':>10} {'ms/sample':>10}  shape per item")
    with tempfile.TemporaryDirectory() as tmp:
        for name in synthetic_modalities():
            spec = get_modality(name)
            tokenizer = spec.tokenizer(universal, {})
            rng = random.Random(0)
            paths = []
            for i in range(args.items):
                raw, _ = spec.synthetic.make(rng)
                path = Path(tmp) / f"{name}_{i}{spec.synthetic.suffix}"
                spec.synthetic.save(raw, path)
                paths.append(path)
            rates = []
            for _ in range(args.reps):
                start = time.perf_counter()
                for b in range(0, len(paths), args.batch):
                    items = [
                        {name: spec.preprocess(spec.load(p), tokenizer).unsqueeze(0)} for p in paths[b : b + args.batch]
                    ]
                    batch = collate_media(items)
                rates.append(len(paths) / (time.perf_counter() - start))
            rate = statistics.median(rates)
            shape = tuple(batch[name].shape[1:])
            print(f"{name:<8} {spec.synthetic.suffix[1:]:<6} {rate:>10.0f} {1000 / rate:>10.2f}  {shape}")


if __name__ == "__main__":
    main()
