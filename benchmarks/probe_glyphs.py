"""Where the glyphs quickstart loses its answers: in the vision tower, or between the tower and the LM?

    mmalign quickstart --dataset glyphs            # writes runs/quickstart_glyphs and data/glyphs
    python benchmarks/probe_glyphs.py [--run runs/quickstart_glyphs] [--data data/glyphs]

Measurements on held-out images:
1. Linear probes on the frozen tower's image tokens, exactly those the connector reads (layer -2, no CLS), per
   scene attribute: from all tokens side by side (position kept), and from the mean of the left-half and of the
   right-half tokens. A left-digit attribute read as well from the right half as from the left means every token
   carries the whole scene: nothing in a token says which side it describes.
2. How well each token's own features tell its column's side (left or right half). 2b: whether the asked digit's
   colour can be read from those tokens at all by a small side-conditioned attention readout (SideReadout), and
   after how many examples: the LM sees about 7,500 colour questions in stage 2.
3. The trained model's answers to "what colour / digit is on the {side}": right, the other digit's answer (the
   side was confused), or neither.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from mmalign.contrastive.data2vec import linear_probe
from mmalign.data.glyphs import ATTRIBUTES
from mmalign.data.processor import processor_for, read_records
from mmalign.data.shapes import load_split


@torch.no_grad()
def tokens(encoder, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, H, W) -> (N, rows, cols, D) image tokens on the patch grid."""
    out = torch.cat([encoder(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)])
    side = int(out.shape[1] ** 0.5)
    return out.view(len(out), side, side, -1)


def labels(scenes: list[dict], attribute: str) -> torch.Tensor:
    return torch.tensor([ATTRIBUTES[attribute].index(s[attribute]) for s in scenes])


def probe_tower(encoder, data: Path, n_train: int) -> None:
    train_px, train_scenes = load_split(data, "train", encoder)
    test_px, test_scenes = load_split(data, "test", encoder)
    train_tok, test_tok = tokens(encoder, train_px[:n_train]), tokens(encoder, test_px)
    train_scenes = train_scenes[:n_train]
    half = train_tok.shape[2] // 2
    views = {
        "all tokens": lambda t: t.flatten(1),
        "left-half mean": lambda t: t[:, :, :half].mean((1, 2)),
        "right-half mean": lambda t: t[:, :, half:].mean((1, 2)),
    }
    print(f"1. linear probes on the tower's tokens ({n_train} training images, {len(test_px)} held out)")
    print(f"{'attribute':14s}" + "".join(f"{v:>17s}" for v in views))
    for attribute in ATTRIBUTES:
        ytr, yte = labels(train_scenes, attribute), labels(test_scenes, attribute)
        accs = [linear_probe(f(train_tok), ytr, f(test_tok), yte) for f in views.values()]
        print(f"{attribute:14s}" + "".join(f"{a:17.1%}" for a in accs))
    d = train_tok.shape[-1]
    cols = torch.arange(train_tok.shape[2])
    side_of = (cols >= half).long().repeat(train_tok.shape[1])  # each token's side, row by row
    n = min(300, n_train)
    acc = linear_probe(
        train_tok[:n].reshape(-1, d), side_of.repeat(n), test_tok.reshape(-1, d), side_of.repeat(len(test_tok))
    )
    print(f"\n2. a token's side (left or right half) from its own features: {acc:.1%} (chance 50%)")


class SideReadout(torch.nn.Module):
    """What the LM has to do for "what colour is the {side} digit": a query made from the side attends over the
    frozen image tokens (each with a learned position), and a small MLP reads the answer from what it pooled."""

    def __init__(self, dim: int, tokens: int, classes: int):
        super().__init__()
        self.side, self.pos = torch.nn.Embedding(2, dim), torch.nn.Parameter(torch.zeros(tokens, dim))
        self.query, self.key = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        self.head = torch.nn.Sequential(torch.nn.Linear(2 * dim, 128), torch.nn.GELU(), torch.nn.Linear(128, classes))

    def forward(self, tok: torch.Tensor, side: torch.Tensor) -> torch.Tensor:  # (B, T, D), (B,) -> (B, classes)
        tok = tok + self.pos
        weights = (self.query(self.side(side))[:, None] * self.key(tok)).sum(-1).softmax(-1)  # (B, T)
        return self.head(torch.cat([(weights[..., None] * tok).sum(1), self.side(side)], -1))


def side_readout(encoder, data: Path, n_train: int, checkpoints=(240, 600, 1500)) -> None:
    """Trains SideReadout on the training images (a random side per example, batches of 32, as many colour
    questions per step as the LM sees in about 2 steps) and scores both sides of every test image."""
    train_px, train_scenes = load_split(data, "train", encoder)
    test_px, test_scenes = load_split(data, "test", encoder)
    train_tok = tokens(encoder, train_px[:n_train]).flatten(1, 2)  # (N, T, D)
    test_tok = tokens(encoder, test_px).flatten(1, 2)
    colours = [labels(train_scenes[:n_train], f"{s}_color") for s in ("left", "right")]
    test_colours = [labels(test_scenes, f"{s}_color") for s in ("left", "right")]
    model = SideReadout(train_tok.shape[-1], train_tok.shape[1], len(ATTRIBUTES["left_color"]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print("\n2b. a side-conditioned attention readout of the asked colour, on the frozen tokens")
    for step in range(1, max(checkpoints) + 1):
        idx, side = torch.randint(0, len(train_tok), (32,)), torch.randint(0, 2, (32,))
        target = torch.where(side == 0, colours[0][idx], colours[1][idx])
        loss = torch.nn.functional.cross_entropy(model(train_tok[idx], side), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in checkpoints:
            with torch.no_grad():
                accs = [model(test_tok, torch.full((len(test_tok),), s)).argmax(-1).eq(test_colours[s]).float().mean()
                        for s in (0, 1)]  # fmt: skip
            print(f"  after {step:4d} steps ({32 * step:6d} examples): left {accs[0]:.1%}, right {accs[1]:.1%}")


def answer_sides(run: Path, data: Path) -> None:
    from mmalign.config import load_recipe
    from mmalign.evaluate import evaluate_vqa
    from mmalign.train.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(run / "stage2")
    ran = load_recipe(str(run / "stage2" / "train_config.yaml"))  # the chat template and limits stage 2 trained with
    processor = processor_for(model, tokenizer, ran.data)
    test = data / "qa_test.json"
    seen = evaluate_vqa(model, processor, test, data / "images", progress=False)
    records = {r["id"]: r for r in read_records(test)}
    scenes = json.loads((data / "scenes.json").read_text())
    counts: Counter = Counter()
    for p in seen["predictions"]:
        rec = records[p["id"]]
        qtype = rec["question_type"]
        if qtype not in ("color", "digit"):
            continue
        scene, question, gold = scenes[rec["image"]], rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        other = "right" if " left " in f" {question} " else "left"
        answer = p["prediction"].strip()
        kind = "right" if answer == gold else "other side's" if answer == scene[f"{other}_{qtype}"] else "neither"
        counts[qtype, kind] += 1
    print("\n3. the model's answers about one side (both digits share the colour in about half the scenes)")
    for qtype in ("color", "digit"):
        total = sum(c for (q, _), c in counts.items() if q == qtype)
        shares = ", ".join(f"{k} {counts[qtype, k] / total:.1%}" for k in ("right", "other side's", "neither"))
        print(f"  {qtype:6s} ({total}): {shares}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/quickstart_glyphs"))
    ap.add_argument("--data", type=Path, default=Path("data/glyphs"))
    ap.add_argument("--images", type=int, default=3000, help="training images the probes fit on")
    args = ap.parse_args()
    from mmalign.models.encoders import load_tower

    if not (args.run / "stage2").is_dir():
        raise SystemExit(f"{args.run}/stage2 not found: run `mmalign quickstart --dataset glyphs --out {args.run}`")
    start = time.time()
    torch.manual_seed(0)
    encoder = load_tower(args.run / "base" / "encoder").eval()
    probe_tower(encoder, args.data, args.images)
    side_readout(encoder, args.data, args.images)
    answer_sides(args.run, args.data)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
