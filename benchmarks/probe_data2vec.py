"""data2vec self-distillation on the embedded shapes images, judged by linear probes on held-out images.

    python benchmarks/probe_data2vec.py [--data data/shapes] [--steps 1500] [--images 2000]

Trains the tiny ViT with data2vec (no labels), then fits one logistic-regression probe per attribute on its frozen,
mean-pooled features, and does the same for the identical architecture at its random initialisation.
Prints held-out probe accuracy per attribute for both.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mmalign.contrastive.data2vec import linear_probe, pooled_features, train_data2vec
from mmalign.data.shapes import ATTRIBUTES, load_split, write_shapes_dataset
from mmalign.models.encoders import clip_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/shapes"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--images", type=int, default=2000, help="unlabelled training images used")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--ema-start", type=float, default=0.99)
    ap.add_argument("--ema-end", type=float, default=0.999)
    ap.add_argument("--target-norm", default="instance", choices=["instance", "layer"])
    args = ap.parse_args()
    if not (args.data / "scenes.json").is_file():
        write_shapes_dataset(args.data)

    torch.manual_seed(0)
    encoder = clip_encoder(preset="tiny-vit", feature_layer=-1)
    baseline = clip_encoder(preset="tiny-vit", feature_layer=-1)
    baseline.load_state_dict(encoder.state_dict())
    train_px, train_scenes = load_split(args.data, "train", encoder)
    test_px, test_scenes = load_split(args.data, "test", encoder)
    train_px, train_scenes = train_px[: args.images], train_scenes[: args.images]

    start = time.time()
    losses = train_data2vec(
        encoder,
        train_px,
        steps=args.steps,
        lr=args.lr,
        mask_ratio=args.mask_ratio,
        top_k=args.top_k,
        target_norm=args.target_norm,
        ema_start=args.ema_start,
        ema_end=args.ema_end,
    )
    print(f"data2vec: {args.steps} steps in {time.time() - start:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    print(f"{'probe accuracy':16}" + "".join(f"{a:>10}" for a in ATTRIBUTES) + f"{'mean':>10}")
    for name, enc in (("data2vec", encoder), ("random init", baseline)):
        tr, te = pooled_features(enc, train_px), pooled_features(enc, test_px)
        accs = []
        for attribute, values in ATTRIBUTES.items():
            y_tr = torch.tensor([values.index(s[attribute]) for s in train_scenes])
            y_te = torch.tensor([values.index(s[attribute]) for s in test_scenes])
            accs.append(linear_probe(tr, y_tr, te, y_te))
        print(f"{name:16}" + "".join(f"{a:>10.1%}" for a in accs) + f"{sum(accs) / len(accs):>10.1%}")


if __name__ == "__main__":
    main()
